"""The image encoder as extraction calls it: replayed from a CUDA graph it gives the plain call's features."""

import pytest
import torch

from conftest import TINY_VIT, run_cli
from fastcoop.cache.encoder import ImageEncoder
from fastcoop.cache.views import split_eval_transform
from fastcoop.models import load_model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("model", [TINY_VIT, "ViT-B-16"])
def test_the_graphed_encoder_equals_the_plain_one(model):
    """Full and padded last calls, in the autocast dtype, against eager calls of the same sizes."""
    loaded = load_model(model, "none", "cuda")
    _, normalize = split_eval_transform(loaded.preprocess)
    size = loaded.model.visual.image_size
    views = torch.randint(0, 256, (37, 3, *size), dtype=torch.uint8, device="cuda")
    plain = ImageEncoder(loaded.model, normalize, 16, "cuda", torch.float16)(views)
    graphed = ImageEncoder(loaded.model, normalize, 16, "cuda", torch.float16, graph=True)
    # float16 features; a padded call multiplies other shapes than the plain one, so it may round otherwise
    torch.testing.assert_close(graphed(views), plain, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(graphed(views[:5]), plain[:5], rtol=1e-2, atol=1e-2)


def test_a_graph_without_a_gpu_is_refused_before_any_work(tmp_path, capsys, example_images):
    code, _, err = run_cli(capsys, "cache", example_images, "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                           "--pretrained", "none", "--device", "cpu", "--encoder", "graph")
    assert code == 2 and "--encoder graph needs a GPU" in err and not list(tmp_path.iterdir())
