"""The built-in example: a small labelled image set drawn on the fly (coloured shapes), as real JPEG files."""

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: tuple, rng: random.Random, size: int) -> Image.Image:
    background = tuple(rng.randint(150, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.randint(size // 3, size - 16)
    x0, y0 = rng.randint(4, size - extent - 4), rng.randint(4, size - extent - 4)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def make_example_images(root: str | Path, train_per_class: int = 16, test_per_class: int = 8,
                        size: int = 160, seed: int = 0, val_per_class: int = 0) -> Path:
    """Write root/{train,test,val}/<colour>_<shape>/NNN.jpg: 12 classes such as 'red circle' (a val split only
    with val_per_class). Idempotent."""
    root = Path(root)
    rng = random.Random(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class), ("val", val_per_class)):
        if count == 0:
            continue
        for colour, rgb in COLOURS.items():
            for shape in SHAPES:
                folder = root / split / f"{colour}_{shape}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(count):
                    image = _draw(shape, rgb, rng, size)
                    path = folder / f"{i:03d}.jpg"
                    if not path.exists():
                        image.save(path, quality=90)
    return root
