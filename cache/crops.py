"""CoOp's training augmentation, cut two ways: by PIL on the CPU (the published computation: torchvision's
RandomResizedCrop on a PIL image, bicubic, then a horizontal flip) and on the device as matrix products, where the
encoder runs, so that all of an image's views come from one upload of its pixels.

Both draw each view's box and flip from torch's RNG seeded with the view's own seed, so they cut the same boxes. PIL
resizes in two passes, one per axis (the order depends on the crop's shape and Pillow's version): each output pixel
is a weighted sum over a window of input pixels, bicubic weights (a = -0.5) on a support widened by the shrink
factor (its antialiasing), normalised to sum 1 and rounded to 22-bit fixed point, each pass's sum rounded to uint8.
On the device each pass is a product with a matrix of exactly those fixed-point weights, zero outside the crop (so
every view of an image is a product with the same image), in float64, where every product and sum of 8-bit pixels
and 22-bit weights is exact: the views are PIL's, to the bit (tests/test_crops.py compares them on awkward sizes and
real photos).
"""

import PIL
import torch
from torchvision import transforms

PRECISION_BITS = 22  # PIL's fixed point for 8-bit images: 32 - 8 - 2 bits
SUPPORT = 2.0  # the bicubic filter's support, in input pixels at no shrink
BICUBIC_A = -0.5  # PIL's bicubic parameter
COOP_SCALE = (0.08, 1.0)  # the published augmentation's crop areas, as fractions of the image (Tip-Adapter: 0.5–1)
VIEW_BYTES = 256 << 20  # the float64 working set of the views cut together from one image, at most about this
PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def augment_transform(size, scale: tuple[float, float] = COOP_SCALE) -> transforms.Compose:
    """CoOp's training augmentation on a decoded PIL image: random resized crop (scale 0.08–1 unless `scale` says
    otherwise, ratio 3/4–4/3, bicubic, which PIL antialiases), then a horizontal flip with p = 0.5."""
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=tuple(scale), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
    ])


def crop_boxes(height: int, width: int, seeds: list[int], size, scale: tuple[float, float] = COOP_SCALE
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each view's (top, left, height, width) box and flip for an image of this size, as augment_transform draws
    them from the RNG seeded with the view's seed: RandomResizedCrop.get_params, then RandomHorizontalFlip's coin."""
    crop = augment_transform(size, scale).transforms[0]
    size_only = torch.empty(()).expand(3, height, width)  # get_params reads the image's size alone
    boxes, flips = [], []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(seed)
            boxes.append(crop.get_params(size_only, crop.scale, crop.ratio))
            flips.append(bool(torch.rand(1) < 0.5))
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4), torch.tensor(flips, dtype=torch.bool)


def resized_crops(image: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size) -> torch.Tensor:
    """uint8 (3, H, W) image → uint8 (V, 3, h, w) views: each box cropped, resized to `size` as PIL resizes
    (bicubic, antialiased, its two passes in its order) and flipped where asked; on the image's device."""
    out_h, out_w = size
    boxes, flips = boxes.to(image.device), flips.to(image.device)
    views = torch.empty(len(boxes), 3, out_h, out_w, dtype=torch.uint8, device=image.device)
    first = vertical_first(boxes[:, 2], boxes[:, 3], out_h, out_w)
    pixels = image.to(torch.float64)
    _, height, width = image.shape
    step = max(1, VIEW_BYTES // (8 * 3 * (max(height, out_h) * max(width, out_w) + out_w * width + out_h * height)))
    for order in (False, True):
        chosen = torch.nonzero(first == order).flatten()
        for part in chosen.split(step):
            box, n = boxes[part], len(part)
            across = resample_weights(width, box[:, 1], box[:, 3], out_w)  # (n, out_w, width)
            down = resample_weights(height, box[:, 0], box[:, 2], out_h)  # (n, out_h, height)
            if order:  # rows first, all views in one product: (n·out_h, height) @ (height, 3·width)
                rows = down.reshape(n * out_h, height) @ pixels.permute(1, 0, 2).reshape(height, 3 * width)
                rows = _to_uint8(rows).view(n, out_h, 3, width).transpose(1, 2)  # (n, 3, out_h, width)
                cut = _to_uint8(rows @ across.transpose(1, 2)[:, None])
            else:  # columns first, all views in one product: (3·height, width) @ (width, n·out_w)
                columns = pixels.reshape(3 * height, width) @ across.reshape(n * out_w, width).T
                columns = _to_uint8(columns).view(3, height, n, out_w).permute(2, 0, 1, 3)  # (n, 3, height, out_w)
                cut = _to_uint8(down[:, None] @ columns)
            views[part] = torch.where(flips[part, None, None, None], cut.flip(-1), cut).to(torch.uint8)
    return views


def vertical_first(heights: torch.Tensor, widths: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Which crops PIL resizes rows first. Pillow 13 runs the vertical pass first when the height shrinks by more
    than twice as many pixels as the width does; earlier Pillows always ran the horizontal pass first."""
    if PILLOW_MAJOR < 13:
        return torch.zeros_like(heights, dtype=torch.bool)
    shrink = heights - out_h
    return (shrink > 0) & (shrink > (widths - out_w) * 2)


def resample_weights(in_size: int, starts: torch.Tensor, lengths: torch.Tensor, out_size: int) -> torch.Tensor:
    """(V, out_size, in_size) float64: row o of view v holds the weights of output pixel o over a line of
    `in_size` pixels, resizing its span starts[v] .. starts[v] + lengths[v] to `out_size` pixels as PIL's
    precompute_coeffs and normalize_coeffs_8bpc make them (the window clipped to the span, as PIL clips it to the
    cropped image)."""
    device = starts.device
    lengths = lengths.to(torch.float64)[:, None, None]
    scale = lengths / out_size
    filterscale = scale.clamp(min=1.0)
    support = SUPPORT * filterscale
    center = (torch.arange(out_size, dtype=torch.float64, device=device)[None, :, None] + 0.5) * scale
    first = torch.trunc(center - support + 0.5).clamp(min=0)  # C's (int) truncates towards zero
    last = torch.minimum(torch.trunc(center + support + 0.5), lengths)
    x = torch.arange(in_size, dtype=torch.float64, device=device)[None, None, :] - starts[:, None, None]
    inside = (x >= first) & (x < last)
    weights = torch.where(inside, _bicubic((x - center + 0.5) / filterscale), 0.0)
    total = weights.sum(-1, keepdim=True)
    weights = torch.where(total != 0, weights / total, weights)
    scaled = weights * (1 << PRECISION_BITS)  # to fixed point, halves away from zero, as PIL's (int)(x ± 0.5)
    return torch.trunc(scaled + torch.where(scaled < 0, -0.5, 0.5)) / (1 << PRECISION_BITS)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic_filter, term for term."""
    a = BICUBIC_A
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


def _to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """A pass's sums as PIL stores them: rounded half up (its + 1 << 21 before the shift), clipped to 0..255."""
    return torch.floor(sums + 0.5).clamp(0, 255)

