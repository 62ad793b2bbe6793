"""The frozen image encoder as extraction calls it: uint8 views in, float16 features out, `batch` views per call,
in the autocast dtype on a GPU. With `graph`, each call of `batch` views replays one CUDA graph captured for that
shape (the last, smaller call of a split is padded to it: every view's features depend on that view alone), so the
host launches a whole forward at once instead of its few hundred kernels one by one."""

from contextlib import nullcontext

import torch

from fastcoop.cache.views import model_input
from fastcoop.errors import FastCoopError


class ImageEncoder:
    def __init__(self, model, normalize, batch: int, device: str, dtype: torch.dtype | None, graph: bool = False):
        self.model, self.normalize, self.batch, self.device, self.dtype = model, normalize, batch, device, dtype
        if graph and not device.startswith("cuda"):
            raise FastCoopError("--encoder graph needs a GPU (--device cuda)")
        self.graph, self.static_in, self.static_out = None, None, None
        self.wants_graph = graph

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 (n, 3, H, W) on the device → float16 (n, D)."""
        try:
            return torch.cat([self._encode(chunk) for chunk in views.split(self.batch)])
        except torch.cuda.OutOfMemoryError:
            raise FastCoopError(f"out of GPU memory encoding {self.batch} views per call: run the same command "
                                f"with --batch-size {max(1, self.batch // 2)} (it goes on after the images "
                                "already written)") from None

    def _encode(self, views: torch.Tensor) -> torch.Tensor:
        if not self.wants_graph:
            return self._forward(views)
        if self.graph is None:
            self._capture(views.shape[1:])
        self.static_in[:len(views)].copy_(views)
        self.graph.replay()
        return self.static_out[:len(views)].clone()

    def _forward(self, views: torch.Tensor, cache_casts: bool = True) -> torch.Tensor:
        autocast = torch.autocast("cuda", dtype=self.dtype, cache_enabled=cache_casts) \
            if self.dtype and self.device.startswith("cuda") else nullcontext()
        with torch.no_grad(), autocast:
            return self.model.encode_image(model_input(views, self.normalize)).half()

    def _capture(self, shape) -> None:
        """Warm up on a side stream (cuBLAS and cuDNN choose their kernels), then capture one call of `batch`
        views; autocast's cast cache stays off inside the graph, so its weight casts are part of each replay."""
        self.static_in = torch.zeros((self.batch, *shape), dtype=torch.uint8, device=self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(self.static_in, cache_casts=False)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._forward(self.static_in, cache_casts=False)
