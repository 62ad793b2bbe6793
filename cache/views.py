"""An image's views for the cache: decoded once, its eval view (the model's own transform) and its augmented views,
each augmented view seeded by (split, row, view), so that a view depends on nothing else (batching, workers,
processes, resumes). Two crop engines: 'pil' cuts the views in the worker that decoded the image (the published
computation, on the CPU); 'device' has the worker draw the same boxes and flips and hand over the decoded pixels,
which crops.resized_crops cuts where the encoder runs, equal to PIL's.
"""

import zlib

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from fastcoop.cache.crops import COOP_SCALE, augment_transform, crop_boxes, resized_crops
from fastcoop.errors import FastCoopError

AUGMENT_SEED = 0
ENGINES = ("pil", "device")


def view_seed(split: str, row: int, view: int) -> int:
    return zlib.crc32(f"{AUGMENT_SEED}/{split}/{row}/{view}".encode())


def split_eval_transform(preprocess: transforms.Compose) -> tuple[transforms.Compose, transforms.Normalize]:
    """The model's eval transform as (its image part: resize, crop, mode; its Normalize). open_clip's transforms
    end in ToTensor + Normalize; anything else is refused rather than guessed."""
    steps = list(preprocess.transforms)
    if len(steps) < 2 or not isinstance(steps[-2], transforms.ToTensor) or \
            not isinstance(steps[-1], transforms.Normalize):
        raise FastCoopError(f"the model's image transform does not end in ToTensor + Normalize: {preprocess}")
    return transforms.Compose(steps[:-2]), steps[-1]


def model_input(pixels: torch.Tensor, normalize: transforms.Normalize) -> torch.Tensor:
    """uint8 (..., 3, H, W) → the encoder's input, by ToTensor's and Normalize's own operations (÷255 in the
    default float dtype, then − mean, ÷ std): bit for bit the per-image transform's result on the same device."""
    return TF.normalize(pixels.to(torch.get_default_dtype()).div(255), normalize.mean, normalize.std)


class ImageViews(torch.utils.data.Dataset):
    """Row → (uint8 views (1 + views, 3, h, w): the eval view, then the augmented ones; row; decode error or '').
    With the 'device' engine the augmented views are left uncut: row → (the eval view (1, 3, h, w), the decoded
    image (3, H, W), the views' boxes (views, 4) and flips (views,), row, error), for `cut_views`. An image that
    cannot be decoded gives a blank one's views, and its error."""

    def __init__(self, paths, eval_transform, views: int, split: str, size, engine: str = "pil",
                 scale: tuple[float, float] = COOP_SCALE):
        self.paths, self.eval_transform, self.views, self.split = paths, eval_transform, views, split
        self.size, self.engine, self.scale = list(size), engine, tuple(scale)
        self.augment = augment_transform(self.size, self.scale)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, row):
        error = ""
        try:
            with Image.open(self.paths[row]) as image:
                image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            image, error = Image.new("RGB", tuple(self.size[::-1])), f"{type(exc).__name__}: {exc}"
        seeds = [view_seed(self.split, row, view) for view in range(1, 1 + self.views)]
        eval_view = TF.pil_to_tensor(self.eval_transform(image))
        if self.engine == "device":
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            return (eval_view[None], pixels, *crop_boxes(image.height, image.width, seeds, self.size, self.scale), row,
                    error)
        views = [eval_view]
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                torch.manual_seed(seed)
                views.append(TF.pil_to_tensor(self.augment(image)))
        return torch.stack(views), row, error

    def collate(self, items: list[tuple]) -> tuple:
        """A batch: (views, rows, errors), the 'device' engine's decoded images, boxes and flips as lists."""
        fields = list(zip(*items))
        rows, errors = torch.tensor(fields[-2]), list(fields[-1])
        if self.engine == "device":
            return torch.stack(fields[0]), list(fields[1]), list(fields[2]), list(fields[3]), rows, errors
        return torch.stack(fields[0]), rows, errors


def cut_views(eval_views: torch.Tensor, images: list, boxes: list, flips: list, size, device) -> torch.Tensor:
    """The 'device' engine's batch as uint8 (images, 1 + views, 3, h, w) on `device`: each decoded image goes
    there once and all its views are cut from it (crops.resized_crops)."""
    out = torch.empty(len(images), 1 + len(boxes[0]), 3, *size, dtype=torch.uint8, device=device)
    out[:, :1] = eval_views.to(device, non_blocking=True)
    for i, image in enumerate(images):
        out[i, 1:] = resized_crops(image.to(device, non_blocking=True), boxes[i], flips[i], size)
    return out
