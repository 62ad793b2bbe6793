"""The device crop engine against PIL: the same boxes and flips from the same seeds, and views equal to PIL's to the
bit — on photos, noise, awkward sizes (tiny, large, extreme aspect ratios), greyscale and CMYK JPEGs — and a
cache cut either way holds the same features."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from conftest import DEVICE, TINY_VIT, run_cli
from fastcoop.cache.crops import crop_boxes, resized_crops, vertical_first
from fastcoop.cache.views import ImageViews, cut_views, view_seed

SIZE = [224, 224]


def published_views(image: Image.Image, seeds: list[int]) -> torch.Tensor:
    """torchvision's RandomResizedCrop (bicubic) + RandomHorizontalFlip on the PIL image, as CoOp's loader runs
    them, one seeded draw per view."""
    augment = transforms.Compose([transforms.RandomResizedCrop(SIZE, scale=(0.08, 1.0),
                                                               interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.RandomHorizontalFlip()])
    views = []
    for seed in seeds:
        torch.manual_seed(seed)
        views.append(TF.pil_to_tensor(augment(image)))
    return torch.stack(views)


def device_views(image: Image.Image, seeds: list[int]) -> torch.Tensor:
    """The 'device' engine's views, on the GPU where there is one."""
    boxes, flips = crop_boxes(image.height, image.width, seeds, SIZE)
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).to(DEVICE)
    return resized_crops(pixels, boxes, flips, SIZE).cpu()


def _noise(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("height, width", [(375, 500), (500, 333), (1, 1), (3, 2), (7, 5), (224, 224), (225, 219),
                                           (1200, 40), (30, 1500), (2, 900), (900, 3)])
def test_device_crops_are_pils_on_noise(height, width):
    """Noise makes every rounding visible; the sizes take both pass orders, shrinking and enlarging, and crops of a
    single pixel."""
    seeds = [view_seed("train", 7, v) for v in range(1, 25)]
    image = _noise(height, width)
    assert torch.equal(device_views(image, seeds), published_views(image, seeds))


def test_both_pass_orders_are_exercised():
    boxes, _ = crop_boxes(375, 500, [view_seed("train", 0, v) for v in range(1, 200)], SIZE)
    first = vertical_first(boxes[:, 2], boxes[:, 3], *SIZE)
    import PIL

    assert first.any() and not first.all() if int(PIL.__version__.split(".")[0]) >= 13 else not first.any()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_device_crops_are_pils_on_photos(tmp_path, example_images, mode):
    """Decoded JPEGs of each colour mode, converted to RGB as the cache converts them."""
    seeds = [view_seed("train", 3, v) for v in range(1, 13)]
    for source in sorted((example_images / "train").glob("*/*.jpg"))[::9]:
        path = tmp_path / f"{source.stem}-{mode}.jpg"
        with Image.open(source) as photo:
            photo.convert(mode).resize((161, 97)).save(path, quality=85)
        with Image.open(path) as image:
            assert image.mode == mode
            rgb = image.convert("RGB")
        assert torch.equal(device_views(rgb, seeds), published_views(rgb, seeds))


def test_the_workers_hand_over_the_same_boxes_and_the_batch_is_cut_alike(example_images):
    """ImageViews with either engine, one batch: the 'device' engine's views, cut by cut_views, are the 'pil'
    engine's to the bit, eval view included."""
    from fastcoop.models import load_model, preprocess_config
    from fastcoop.cache.views import split_eval_transform

    loaded = load_model(TINY_VIT, "none")
    pre = preprocess_config(loaded.model)
    eval_image, _ = split_eval_transform(loaded.preprocess)
    paths = [str(p) for p in sorted((example_images / "train").glob("*/*.jpg"))[:5]]
    by_pil = ImageViews(paths, eval_image, 6, "train", pre["size"])
    by_device = ImageViews(paths, eval_image, 6, "train", pre["size"], engine="device")
    pixels, rows, errors = by_pil.collate([by_pil[i] for i in range(5)])
    *parts, rows_d, errors_d = by_device.collate([by_device[i] for i in range(5)])
    assert torch.equal(cut_views(*parts, pre["size"], "cpu"), pixels)
    assert torch.equal(rows, rows_d) and errors == errors_d == [""] * 5


def test_a_cache_cut_on_the_device_equals_one_cut_by_pil(tmp_path, capsys, example_images):
    """The same views give the same features; the engine is recorded, and a resume with the other is refused."""
    import h5py

    from fastcoop.cache import FeatureCache

    common = ["--model", TINY_VIT, "--pretrained", "none", "--shots", "2", "--seeds", "1", "--views", "3",
              "--workers", "0"]
    for engine in ("pil", "device"):
        code, out, err = run_cli(capsys, "cache", example_images, "--out", tmp_path / f"{engine}.h5", "--crops",
                                 engine, *common, *(["--verbose"] if engine == "device" else []))
        assert code == 0, err
    assert "time: decode " in out and ", crop " in out and ", encode " in out  # --verbose: where the time went
    with FeatureCache(tmp_path / "pil.h5") as pil, FeatureCache(tmp_path / "device.h5") as device:
        assert torch.equal(pil.features("train"), device.features("train"))
        assert "crops" not in pil.preprocessing and device.preprocessing["crops"] == "device"
    (tmp_path / "device.h5").rename(tmp_path / "other.h5.partial")  # as if unfinished
    with h5py.File(tmp_path / "other.h5.partial", "a") as f:
        f.attrs["complete"] = False
        f.attrs["batch_size"] = 256
    code, _, err = run_cli(capsys, "cache", example_images, "--out", tmp_path / "other.h5", "--crops", "pil",
                           *common)
    assert code == 2 and "unfinished cache made with other settings (crops: device → pil)" in err
    assert (tmp_path / "other.h5.partial").exists() and not (tmp_path / "other.h5").exists()


def test_the_crop_scale_of_the_views_is_a_cache_option_both_engines_cut_alike(tmp_path, capsys, example_images):
    """`fastcoop cache --crop-scale 0.5,1` (Tip-Adapter's own augmentation): the views are torchvision's
    RandomResizedCrop(scale=(0.5, 1)) draws, the 'device' engine's equal to PIL's to the bit; the scale is part of
    the cache's identity, read back, and checked."""
    import warnings

    from fastcoop.cache import FeatureCache
    from fastcoop.errors import FastCoopError
    from fastcoop.models import load_model, preprocess_config
    from fastcoop.cache.views import split_eval_transform
    from fastcoop.methods.tip_adapter import check_cache

    loaded = load_model(TINY_VIT, "none")
    pre = preprocess_config(loaded.model)
    eval_image, _ = split_eval_transform(loaded.preprocess)
    paths = [str(p) for p in sorted((example_images / "train").glob("*/*.jpg"))[:3]]
    by_pil = ImageViews(paths, eval_image, 4, "train", pre["size"], scale=(0.5, 1.0))
    by_device = ImageViews(paths, eval_image, 4, "train", pre["size"], engine="device", scale=(0.5, 1.0))
    pixels, _, _ = by_pil.collate([by_pil[i] for i in range(3)])
    *parts, _, _ = by_device.collate([by_device[i] for i in range(3)])
    assert torch.equal(cut_views(*parts, pre["size"], "cpu"), pixels)
    augment = transforms.Compose([transforms.RandomResizedCrop(pre["size"], scale=(0.5, 1.0),
                                                               interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.RandomHorizontalFlip()])
    with Image.open(paths[1]) as image:
        torch.manual_seed(view_seed("train", 1, 3))
        assert torch.equal(pixels[1, 3], TF.pil_to_tensor(augment(image.convert("RGB"))))
    common = ["--model", TINY_VIT, "--pretrained", "none", "--shots", "2", "--seeds", "1", "--views", "2",
              "--workers", "0", "--splits", "train,val,test"]  # the train images as a folder of classes, split
    images = example_images / "train"
    assert run_cli(capsys, "cache", images, "--out", tmp_path / "tip.h5", *common, "--crop-scale", "0.5,1")[0] == 0
    assert run_cli(capsys, "cache", images, "--out", tmp_path / "coop.h5", *common)[0] == 0
    with FeatureCache(tmp_path / "tip.h5") as tip, FeatureCache(tmp_path / "coop.h5") as coop:
        assert (tip.crop_scale, coop.crop_scale) == ((0.5, 1.0), (0.08, 1.0))
        assert not torch.equal(tip.features("train", view=1), coop.features("train", view=1))
        for cache, warned in ((coop, True), (tip, False)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                check_cache(cache)
            assert any("published code crops at 0.5–1" in str(w.message) for w in caught) == warned
    with warnings.catch_warnings(record=True) as caught, pytest.raises(FastCoopError, match="no val"):
        warnings.simplefilter("always")
        assert run_cli(capsys, "cache", example_images, "--out", tmp_path / "no-val.h5", *common[:-2])[0] == 0
        check_cache(FeatureCache(tmp_path / "no-val.h5"))  # refused alone: no warning comes before the refusal
    assert not any("Tip-Adapter" in str(w.message) for w in caught)
    code, _, err = run_cli(capsys, "cache", images, "--out", tmp_path / "tip.h5", *common)
    assert code == 2 and "augment: RandomResizedCrop(0.5-1, bicubic)+HFlip → RandomResizedCrop(0.08-1" in err
    for bad in ("0,1", "1,0.5", "half", "0.5"):
        code, _, err = run_cli(capsys, "cache", example_images, "--out", tmp_path / "x.h5", *common, "--crop-scale",
                               bad)
        assert code == 2 and "--crop-scale takes 'low,high'" in err and not (tmp_path / "x.h5").exists()
