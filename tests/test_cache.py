import itertools
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from torchvision import transforms

from conftest import TINY_VIT, run_cli
from fastcoop.cache import FeatureCache, extract_features
from fastcoop.cache.crops import augment_transform
from fastcoop.cache.views import ImageViews, model_input, split_eval_transform, view_seed
from fastcoop.datasets import read_dataset
from fastcoop.errors import FastCoopError
from fastcoop.fewshot import sample_few_shot
from fastcoop.models import load_model, preprocess_config, resolve_model_name

OPTS = dict(shots=2, seeds=[1, 2], views=2, batch_size=5, workers=0, progress=False)


def _contents(path):
    """Every dataset and attribute of an HDF5 file, for whole-file equality."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = dict(f.attrs)
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same_file(a, b):
    ca, cb = _contents(a), _contents(b)
    assert ca.keys() == cb.keys() and ca["attrs"].keys() == cb["attrs"].keys()
    for key in ca:
        if key == "attrs":
            assert all(ca[key][k] == cb[key][k] for k in ca[key])
        else:
            np.testing.assert_array_equal(ca[key], cb[key])


def test_features_equal_direct_encoding(tmp_path, tiny_vit, example_images):
    data = read_dataset(example_images)
    path = extract_features(data, tmp_path / "f.h5", tiny_vit, **OPTS)
    with FeatureCache(path) as cache:
        assert cache.classnames == data.classnames and cache.model == TINY_VIT and cache.pretrained == "none"
        assert cache.subsets() == [(2, 1), (2, 2)]
        paths = cache.paths("train")
        labels = [label for _, label in data.split("train")]
        for seed in (1, 2):  # the subset rows are exactly the published sampler's images, in its order
            rows = cache.rows("train", 2, seed)
            expected = [data.split("train")[i][0] for i in sample_few_shot(labels, 2, seed)]
            assert [paths[r] for r in rows] == expected
        feats = cache.features("train")
        assert feats.shape == (3, len(paths), 32) and feats.dtype == torch.float16
        assert cache.features("test").shape[0] == 1 and cache.labels("test").numel() == 36
    pre = preprocess_config(tiny_vit.model)
    eval_image, normalize = split_eval_transform(tiny_vit.preprocess)
    views = ImageViews(paths, eval_image, 2, "train", pre["size"])
    # the views as the per-image torchvision transforms make them: crop, flip, ToTensor, Normalize on PIL images
    per_image_augment = transforms.Compose([*augment_transform(pre["size"]).transforms, transforms.ToTensor(),
                                            normalize])
    for row in (0, len(paths) - 1):
        pixels, _, error = views[row]
        assert not error and pixels.dtype == torch.uint8
        with Image.open(paths[row]) as image:
            image = image.convert("RGB")
            expected = [tiny_vit.preprocess(image)]
            for view in (1, 2):
                torch.manual_seed(view_seed("train", row, view))
                expected.append(per_image_augment(image))
        inputs = model_input(pixels, normalize)
        for view in range(3):  # bit for bit what the per-image transforms give
            assert torch.equal(inputs[view], expected[view]), view
        assert not torch.equal(inputs[1], inputs[2])  # augmented views differ from each other
        with torch.no_grad():  # every view encoded on its own equals the batched multi-view extraction
            alone = torch.cat([tiny_vit.model.encode_image(x[None]) for x in expected]).half()
        torch.testing.assert_close(feats[:, row], alone, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("read_bytes", [64 << 20, 1, 5000])  # one read; a chunk per read; a few chunks per read
def test_rows_and_views_read_as_taken_from_the_whole_split(tmp_path, monkeypatch, read_bytes):
    """Reading a few rows and views (by runs of the chunks holding them) gives what taking them from the whole
    split gives: any row order, repeated rows, rows in far-apart chunks, none."""
    import fastcoop.cache.store as store

    monkeypatch.setattr(store, "READ_BYTES", read_bytes)
    whole = np.random.default_rng(0).standard_normal((5, 103, 8)).astype(np.float16)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.attrs.update(schema_version=store.SCHEMA_VERSION, complete=True, classnames='["a"]', model="m",
                       pretrained="none", preprocessing="{}", dataset_fingerprint="x", splits='["train", "test"]')
        f.create_dataset("train/features", data=whole, chunks=(5, 6, 8))
        f.create_dataset("test/features", data=whole)  # not chunked
    rows = [np.array([5, 3, 100, 7, 6, 50, 3]), np.arange(103), np.array([102]), np.array([], dtype=np.int64),
            np.random.default_rng(1).permutation(103)[:40], np.arange(0, 103, 7)]
    with FeatureCache(tmp_path / "c.h5") as cache:
        for split, subset, view in itertools.product(("train", "test"), rows, (None, 0, 3, slice(1, 4), slice(1, None))):
            read = cache.features(split, subset, view)
            expected = whole[slice(None) if view is None else view][..., subset, :]
            assert read.dtype == torch.float16 and np.array_equal(read.numpy(), expected), (split, subset, view)


@pytest.mark.parametrize("crops", ["pil", "device"])
def test_interrupted_run_resumes_to_identical_file(tmp_path, tiny_vit, example_images, monkeypatch, crops):
    data = read_dataset(example_images)
    opts = OPTS | {"crops": crops}
    whole = extract_features(data, tmp_path / "whole.h5", tiny_vit, **opts)
    calls = {"n": 0}
    encode = tiny_vit.model.encode_image

    def dying_encode(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return encode(x)

    monkeypatch.setattr(tiny_vit.model, "encode_image", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        extract_features(data, tmp_path / "resumed.h5", tiny_vit, **opts)
    assert not (tmp_path / "resumed.h5").exists() and (tmp_path / "resumed.h5.partial").exists()
    with pytest.raises(FastCoopError, match="unfinished"):
        FeatureCache(tmp_path / "resumed.h5")
    monkeypatch.setattr(tiny_vit.model, "encode_image", encode)
    with h5py.File(tmp_path / "resumed.h5.partial", "r") as f:
        assert 0 < f["train"].attrs["done"] < f["train/labels"].shape[0]
    extract_features(data, tmp_path / "resumed.h5", tiny_vit, **opts)
    assert not (tmp_path / "resumed.h5.partial").exists()
    _assert_same_file(whole, tmp_path / "resumed.h5")


@pytest.mark.slow
def test_corrupt_image_exit_2_or_skipped(tmp_path, capsys, example_images):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(example_images, root)
    bad = root / "train" / "red_circle" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    args = [root, "--out", tmp_path / "f.h5", "--model", TINY_VIT, "--pretrained", "none", "--shots", "all",
            "--workers", "0", "--batch-size", "8"]
    code, _, err = run_cli(capsys, "cache", *args)
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(error_lines) == 1 and str(bad) in error_lines[0] and "Traceback" not in err
    assert not (tmp_path / "f.h5").exists()
    code, out, _ = run_cli(capsys, "cache", *args, "--skip-bad")
    assert code == 0 and "skipped 1" in out
    with FeatureCache(tmp_path / "f.h5") as cache:
        assert str(bad) not in cache.paths("train") and len(cache.paths("train")) == 71
        assert [p.decode() for p in cache.file["skipped"][()]] == [str(bad)]


def test_an_image_a_split_file_lists_but_is_missing_is_refused_or_skipped(tmp_path, capsys, example_images):
    """A CoOp split file naming an image that is not there: one line naming it (and --skip-bad); with --skip-bad
    it is recorded as skipped like an unreadable one, not a crash in the dataset's fingerprint."""
    import json
    import shutil

    classes = sorted(p.name for p in (example_images / "train").iterdir())[:2]
    for c in classes:
        shutil.copytree(example_images / "train" / c, tmp_path / "eurosat" / "2750" / c)
    rows = [[f"{c}/{img.name}", i, c] for i, c in enumerate(classes)
            for img in sorted((tmp_path / "eurosat" / "2750" / c).iterdir())]
    gone = tmp_path / "eurosat" / "2750" / classes[0] / "gone.jpg"
    (tmp_path / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(
        {"train": rows + [[f"{classes[0]}/gone.jpg", 0, classes[0]]], "val": [], "test": rows[:2]}))
    args = [tmp_path / "eurosat", "--out", tmp_path / "f.h5", "--model", TINY_VIT, "--pretrained", "none", "--shots",
            "all", "--views", "0", "--workers", "0"]
    code, out, err = run_cli(capsys, "cache", *args)
    assert code == 2 and not out and err.strip() == (f"error: {tmp_path / 'eurosat' / 'split_zhou_EuroSAT.json'} "
                                                      f"lists {gone}, which does not exist (--skip-bad skips it)")
    code, out, err = run_cli(capsys, "cache", *args, "--skip-bad")
    assert code == 0 and "skipped 1" in out, err
    with FeatureCache(tmp_path / "f.h5") as cache:
        assert [p.decode() for p in cache.file["skipped"][()]] == [str(gone)]
        assert len(cache.paths("train")) == len(rows)


@pytest.mark.slow
def test_skipped_images_are_rows_every_reader_leaves_out_in_a_clean_caches_layout(tmp_path, capsys, example_images):
    """--skip-bad rewrites nothing: the file has a clean cache's datasets, chunking and size, its unreadable row
    marked; every reader (whole split, few-shot subsets, labels, paths, counts) leaves that row out and reads the
    others as the clean cache holds them."""
    import os
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(example_images, root)
    bad = root / "train" / "red_circle" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated JPEG
    args = ["--model", TINY_VIT, "--pretrained", "none", "--shots", "2", "--seeds", "1,2", "--workers", "0",
            "--batch-size", "8", "--views", "1"]
    assert run_cli(capsys, "cache", example_images, "--out", tmp_path / "clean.h5", *args)[0] == 0
    assert run_cli(capsys, "cache", root, "--out", tmp_path / "skip.h5", *args, "--skip-bad")[0] == 0
    with FeatureCache(tmp_path / "clean.h5") as clean, FeatureCache(tmp_path / "skip.h5") as skip:
        for name in ("features", "labels", "paths"):
            ours, theirs = skip.file["train"][name], clean.file["train"][name]
            assert (ours.shape, ours.chunks) == (theirs.shape, theirs.chunks), name
        features = skip.file["train/features"].id.get_storage_size()
        assert features == clean.file["train/features"].id.get_storage_size()
        every = clean.paths("train")
        row = every.index(str(example_images / "train" / "red_circle" / "001.jpg"))
        kept = [r for r in range(len(every)) if r != row]
        assert skip.num_images("train") == len(kept) and len(skip.labels("train")) == len(kept)
        assert [p.replace(str(root), str(example_images)) for p in skip.paths("train")] == [every[r] for r in kept]
        torch.testing.assert_close(skip.features("train"), clean.features("train", kept), atol=2e-3, rtol=2e-3)
        for seed in (1, 2):
            theirs = clean.rows("train", 2, seed)
            assert skip.rows("train", 2, seed).tolist() == [r for r in theirs.tolist() if r != row]
        assert skip.rows("test").tolist() == clean.rows("test").tolist()
    # the same file but for the /skipped list and the longer image folder's paths, not a second copy of the rows
    assert abs(os.path.getsize(tmp_path / "skip.h5") - os.path.getsize(tmp_path / "clean.h5")) <= 4096
    assert features > 4096


def test_mismatched_existing_file_is_refused(tmp_path, capsys, example_images):
    out = tmp_path / "f.h5"
    base = ["cache", example_images, "--out", out, "--model", TINY_VIT, "--pretrained", "none", "--shots", "1",
            "--seeds", "1", "--workers", "0"]
    assert run_cli(capsys, *base)[0] == 0
    before = _contents(out)
    code, _, err = run_cli(capsys, *base[:-2], "--views", "1", "--workers", "0")
    assert code == 2 and "--overwrite" in err
    assert _contents(out).keys() == before.keys()  # untouched
    assert run_cli(capsys, *base)[0] == 0  # same settings: reused
    code, _, _ = run_cli(capsys, *base, "--views", "1", "--overwrite")
    assert code == 0 and FeatureCache(out).num_views("train") == 2


def test_missing_subset_is_a_clear_error(tmp_path, tiny_vit, example_images):
    path = extract_features(read_dataset(example_images), tmp_path / "f.h5", tiny_vit, **OPTS)
    with pytest.raises(FastCoopError, match="--shots 4 --seeds 1"):
        FeatureCache(path).rows("train", 4, 1)


def test_local_checkpoint_and_bad_weights(tmp_path, capsys, tiny_vit, example_images):
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_vit.model.state_dict(), ckpt)
    loaded = load_model(TINY_VIT, str(ckpt))
    assert loaded.pretrained == str(ckpt.resolve())
    for name, p in tiny_vit.model.state_dict().items():
        assert torch.equal(p, loaded.model.state_dict()[name]), name
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FastCoopError, match="could not read checkpoint"):
        load_model(TINY_VIT, str(tmp_path / "junk.pt"))
    with pytest.raises(FastCoopError, match="not an open_clip weight tag"):
        load_model("ViT-B-32", "no-such-tag")
    code, _, err = run_cli(capsys, "cache", example_images, "--out", tmp_path / "x.h5", "--model", "ViT-B-99")
    assert code == 2 and "unknown model 'ViT-B-99'" in err


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("which", ["tiny_vit", "tiny_rn"])
def test_a_checkpoint_fills_a_meta_built_model_exactly(tmp_path, request, which, suffix):
    """Weights from a file go into a model built on the meta device (no random init): every parameter and buffer,
    the rebuilt causal masks included, equals the model the checkpoint was saved from, and so do its features."""
    from safetensors.torch import save_file

    from fastcoop.models import _causal_mask_buffers, preprocess_config

    source = request.getfixturevalue(which)
    state = {name: t.contiguous() for name, t in source.model.state_dict().items()}
    ckpt = tmp_path / f"model{suffix}"
    save_file(state, ckpt) if suffix == ".safetensors" else torch.save(state, ckpt)
    loaded = load_model(source.name, str(ckpt))
    assert _causal_mask_buffers(loaded.model)  # the meta-built path was taken: its masks were rebuilt
    theirs = dict(source.model.named_buffers()) | dict(source.model.named_parameters())
    ours = dict(loaded.model.named_buffers()) | dict(loaded.model.named_parameters())
    assert theirs.keys() == ours.keys() and "attn_mask" in ours
    for name in theirs:
        assert torch.equal(theirs[name], ours[name]), name
    tokens = source.tokenizer(["a photo of a dog.", "a cat"])
    images = torch.randn(2, 3, *preprocess_config(source.model)["size"])
    assert torch.equal(source.model.encode_text(tokens), loaded.model.encode_text(tokens))
    assert torch.equal(source.model.encode_image(images), loaded.model.encode_image(images))


@pytest.mark.parametrize("layout", ["safetensors", "pt", "pt wrapped", "pt prefixed"])
def test_without_the_image_tower_the_rest_loads_exactly_and_reads_only_its_tensors(tmp_path, tiny_vit, monkeypatch,
                                                                                layout):
    """image_tower=False: everything outside the image tower equals the full load (so do text features), the image
    tower stays on the meta device, and its tensors are never read. Checkpoints in another layout (a training
    checkpoint's {'state_dict': ...}, 'module.' names) are read whole by open_clip's loader, as before."""
    import safetensors

    from fastcoop.models import _causal_mask_buffers

    state = {name: t.contiguous() for name, t in tiny_vit.model.state_dict().items()}
    ckpt = tmp_path / f"model.{layout.split()[0]}"
    if layout == "safetensors":
        safetensors.torch.save_file(state, ckpt)
    else:
        torch.save({"state_dict": state} if layout == "pt wrapped" else
                   {f"module.{k}": t for k, t in state.items()} if layout == "pt prefixed" else state, ckpt)
    full = load_model(TINY_VIT, str(ckpt))
    read = _record_checkpoint_reads(monkeypatch)
    text_only = load_model(TINY_VIT, str(ckpt), image_tower=False)
    fast = layout in ("safetensors", "pt")
    assert _causal_mask_buffers(text_only.model)
    if fast:
        assert read and not [key for key in read if key.startswith("visual.")]
    ours = text_only.model.state_dict()
    for name, t in full.model.state_dict().items():
        if name.startswith("visual."):
            assert ours[name].is_meta == fast, name
        else:
            assert torch.equal(t, ours[name]), name
    tokens = tiny_vit.tokenizer(["a photo of a dog.", "a cat"])
    assert torch.equal(full.model.encode_text(tokens), text_only.model.encode_text(tokens))


def _record_checkpoint_reads(monkeypatch) -> list[str]:
    """The names of the tensors read from now on from a safetensors file (fastcoop.models' safe_open) or from the
    dict torch.load returns."""
    import fastcoop.models as models

    read, real_open, real_load = [], models.safe_open, torch.load

    class RecordingFile:
        def __init__(self, *args, **kwargs):
            self.opened = real_open(*args, **kwargs)

        def __enter__(self):
            self.opened.__enter__()
            return self

        def __exit__(self, *exc):
            return self.opened.__exit__(*exc)

        def keys(self):
            return self.opened.keys()

        def get_slice(self, key):
            return self.opened.get_slice(key)

        def get_tensor(self, key):
            read.append(key)
            return self.opened.get_tensor(key)

    class RecordingDict(dict):
        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    monkeypatch.setattr(models, "safe_open", RecordingFile)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: (
        lambda held: RecordingDict(held) if isinstance(held, dict) else held)(real_load(*args, **kwargs)))
    return read


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A stand-in Hugging Face hub: `cached` (repo/file → path) is the local cache, `reachable` whether the endpoint
    answers; each request made is recorded in `asked`."""
    import huggingface_hub
    import open_clip

    state = {"cached": {}, "reachable": True, "asked": []}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"hf_hub": f"org/{name}-{tag}/"})
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo, filename: state["cached"].get(f"{repo}/{filename}"))

    class Session:
        def head(self, url, timeout):
            state["asked"].append(("head", url, timeout))
            if not state["reachable"]:
                raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub, "get_session", Session)
    monkeypatch.setattr(open_clip, "download_pretrained", lambda cfg: state["asked"].append(("download", cfg))
                        or str(tmp_path / "downloaded.bin"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return state


def test_weights_come_from_the_hub_cache_without_a_request(hub, tmp_path):
    """A cached tag is found by huggingface_hub's cache lookup (its safetensors first) with no request at all, so an
    offline machine answers at once; a checkpoint path is used as it is; nothing process-wide changes."""
    import huggingface_hub

    from fastcoop.models import weights_file

    hub["cached"] = {"org/ViT-B-16-openai/open_clip_pytorch_model.bin": "/hf/model.bin"}
    assert weights_file("ViT-B-16", "openai") == "/hf/model.bin"
    hub["cached"]["org/ViT-B-16-openai/open_clip_model.safetensors"] = "/hf/model.safetensors"
    assert weights_file("ViT-B-16", "openai") == "/hf/model.safetensors"
    checkpoint = tmp_path / "local.pt"
    checkpoint.write_bytes(b"")
    assert weights_file("ViT-B-16", str(checkpoint)) == str(checkpoint)
    assert hub["asked"] == [] and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_weights_not_cached_are_fetched_by_huggingface_hub_when_it_answers(hub):
    """One quick look through huggingface_hub's own client (its proxies and endpoint), then open_clip's download
    through huggingface_hub; unreachable, or HF_HUB_OFFLINE set, is one clear line and no download."""
    import huggingface_hub

    from fastcoop.models import weights_file

    assert weights_file("ViT-B-16", "openai").endswith("downloaded.bin")
    assert [a[0] for a in hub["asked"]] == ["head", "download"]
    assert hub["asked"][0][1:] == (huggingface_hub.constants.ENDPOINT, 3.0)
    hub["asked"].clear()
    hub["reachable"] = False
    with pytest.raises(FastCoopError, match="not in the local Hugging Face cache and .* cannot be reached.*--pretrained"):
        weights_file("ViT-B-16", "openai")
    assert [a[0] for a in hub["asked"]] == ["head"]
    hub["asked"].clear()
    huggingface_hub.constants.HF_HUB_OFFLINE = True  # the user's own offline mode: not even the look
    with pytest.raises(FastCoopError, match="cannot be reached"):
        weights_file("ViT-B-16", "openai")
    assert hub["asked"] == []


def test_only_models_whose_unsaved_buffers_are_causal_masks_are_built_on_meta():
    from fastcoop.models import _causal_mask_buffers, _own_towers

    assert _own_towers("ViT-B-16") and _own_towers("RN50") and _own_towers(resolve_model_name(TINY_VIT))
    assert not _own_towers("convnext_base") and not _own_towers("xlm-roberta-base-ViT-B-32")  # timm, HF towers
    model = torch.nn.Module()
    model.register_buffer("attn_mask", torch.zeros(4, 4), persistent=False)
    model.register_buffer("running_mean", torch.zeros(4))  # saved: a checkpoint fills it
    assert _causal_mask_buffers(model) == [(model, "attn_mask")]
    model.register_buffer("freqs", torch.zeros(4), persistent=False)  # unsaved and unknown: built the plain way
    assert _causal_mask_buffers(model) is None


def test_default_workers_leave_the_gpu_feeder_a_core_and_share_the_node(monkeypatch):
    from fastcoop.cache.plan import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (default_workers("cuda"), default_workers("cuda:1"), default_workers("cpu")) == (15, 15, 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun, 8 GPUs on the node: 2 cores each
    assert (default_workers("cuda"), default_workers("cpu")) == (1, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(256)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert (default_workers("cuda"), default_workers("cpu")) == (32, 8)


def test_unreadable_partial_file_is_started_over(tmp_path, tiny_vit, example_images):
    """A kill -9 can leave the .partial file unreadable: the next run starts it over and still ends right."""
    data = read_dataset(example_images)
    whole = extract_features(data, tmp_path / "whole.h5", tiny_vit, **OPTS)
    (tmp_path / "again.h5.partial").write_bytes(b"\x89HDF\r\n" + bytes(300))
    extract_features(data, tmp_path / "again.h5", tiny_vit, **OPTS)
    _assert_same_file(whole, tmp_path / "again.h5")


@pytest.mark.slow
def test_cli_caches_a_coop_split_file(tmp_path, capsys, example_images):
    """The published code's split file used as it is, with its images under a subfolder."""
    import json
    import shutil

    shutil.copytree(example_images / "train", tmp_path / "images")
    classes = sorted(p.name for p in (tmp_path / "images").iterdir())
    entries = [[f"{c}/{img.name}", i, c] for i, c in enumerate(classes)
               for img in sorted((tmp_path / "images" / c).iterdir())]
    (tmp_path / "split_zhou_Shapes.json").write_text(json.dumps({"train": entries[::2], "val": [],
                                                                 "test": entries[1::2]}))
    code, out, err = run_cli(capsys, "cache", tmp_path, "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                             "--pretrained", "none", "--shots", "2", "--seeds", "1", "--workers", "0")
    assert code == 0, err
    with FeatureCache(tmp_path / "f.h5") as cache:
        assert cache.classnames == [c.replace("_", " ") for c in classes]
        assert cache.splits == ["train", "test"] and len(cache.rows("train", 2, 1)) == 24


def _wait_for_rows(process, partial, rows: int) -> None:
    """Until a `fastcoop cache` process has flushed `rows` train rows to its partial file, or has ended (the test
    process must open the file with HDF5_USE_FILE_LOCKING=FALSE)."""
    import time

    done = 0
    while process.poll() is None and done < rows:
        time.sleep(0.01)
        try:
            with h5py.File(partial, "r") as f:
                done = int(f["train"].attrs["done"])
        except (OSError, KeyError):
            pass  # not created yet, or caught mid-write


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """A real SIGKILL of `fastcoop cache` after some batches; the same command then finishes the same file."""
    import os
    import signal
    import subprocess
    import sys

    from fastcoop.example import make_example_images

    monkeypatch.setenv("HDF5_USE_FILE_LOCKING", "FALSE")  # so this test can watch the file being written
    images = make_example_images(tmp_path / "imgs", train_per_class=20, test_per_class=1, size=48)
    command = [sys.executable, "-m", "fastcoop", "cache", str(images), "--model", TINY_VIT, "--pretrained", "none",
               "--shots", "all", "--views", "4", "--batch-size", "2", "--workers", "0"]
    partial = tmp_path / "killed.h5.partial"
    process = subprocess.Popen(command + ["--out", str(tmp_path / "killed.h5")], env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_rows(process, partial, 20)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL and not (tmp_path / "killed.h5").exists()
    for out in ("killed.h5", "whole.h5"):
        subprocess.run(command + ["--out", str(tmp_path / out)], check=True, capture_output=True)
    _assert_same_file(tmp_path / "killed.h5", tmp_path / "whole.h5")


def test_openai_weights_get_the_quick_gelu_they_were_trained_with(monkeypatch):
    """open_clip builds 'ViT-B-16' with exact GELU and only warns when OpenAI's QuickGELU-trained weights go in;
    load_model asks for QuickGELU whenever the tag was trained with it (no download here: the call is caught)."""
    import open_clip

    from fastcoop.models import trained_with_quick_gelu

    assert trained_with_quick_gelu("ViT-B-16", "openai") and trained_with_quick_gelu("RN50", "openai")
    assert not trained_with_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not trained_with_quick_gelu("ViT-B-16", "none")
    calls = []

    def create(name, **kwargs):
        calls.append((name, kwargs))
        raise RuntimeError("offline")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", create)
    monkeypatch.setattr("fastcoop.models.weights_file", lambda name, tag: f"/cache/{name}-{tag}.safetensors")
    with pytest.raises(FastCoopError, match="could not read checkpoint /cache/ViT-B-16-openai.safetensors"):
        load_model("ViT-B-16", "openai")
    assert calls == [("ViT-B-16", {"pretrained": "openai", "load_weights": False, "device": "meta",
                                   "force_quick_gelu": True})]
    # and open_clip honours the request: the text tower's MLP activation becomes QuickGELU
    name = resolve_model_name(TINY_VIT)
    for force, activation in ((False, torch.nn.GELU), (True, QuickGELU)):
        model = open_clip.create_model(name, force_quick_gelu=force)
        assert type(model.transformer.resblocks[0].mlp.gelu) is activation


@pytest.mark.slow
def test_torchrun_two_processes_write_the_one_process_file(tmp_path, example_images):
    """torchrun with the gloo backend on CPU: each rank encodes every other batch, rank 0 writes."""
    import os
    import subprocess
    import sys

    args = ["cache", str(example_images), "--model", TINY_VIT, "--pretrained", "none", "--shots", "2",
            "--seeds", "1,2", "--views", "3", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun's per-rank default, for the one-process run too
    subprocess.run([sys.executable, "-m", "fastcoop", *args, "--out", str(tmp_path / "one.h5")], env=env,
                   check=True, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastcoop", *args, "--out", str(tmp_path / "two.h5")], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports
    _assert_same_file(tmp_path / "one.h5", tmp_path / "two.h5")


def test_disk_full_is_exit_2_and_the_partial_file_resumes(tmp_path, capsys, tiny_vit, example_images, monkeypatch):
    import errno

    from fastcoop.cache import writer

    data = read_dataset(example_images)
    whole = extract_features(data, tmp_path / "whole.h5", tiny_vit, **OPTS)
    write_rows, calls = writer.write_rows, {"n": 0}

    def full_disk(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_rows(*args)

    monkeypatch.setattr(writer, "write_rows", full_disk)
    with pytest.raises(FastCoopError, match="disk is full while writing .*resume"):
        extract_features(data, tmp_path / "f.h5", tiny_vit, **OPTS)
    assert (tmp_path / "f.h5.partial").exists() and not (tmp_path / "f.h5").exists()
    monkeypatch.setattr(writer, "write_rows", write_rows)
    extract_features(data, tmp_path / "f.h5", tiny_vit, **OPTS)
    _assert_same_file(whole, tmp_path / "f.h5")


@pytest.mark.parametrize("views", ["-1", "two", "", "1.5"])
def test_bad_views_is_one_line_exit_2(tmp_path, capsys, example_images, views):
    code, _, err = run_cli(capsys, "cache", example_images, "--out", tmp_path / "f.h5", "--model", TINY_VIT,
                           "--pretrained", "none", "--views", views)
    assert code == 2 and err.strip().splitlines() == [f"error: --views must be a non-negative integer or 'auto', "
                                                      f"not '{views}'"]
    assert not list(tmp_path.iterdir())


def test_out_of_gpu_memory_names_a_batch_size_and_the_smaller_one_resumes(tmp_path, capsys, tiny_vit,
                                                                           example_images, monkeypatch):
    """The encoder running out of memory (simulated): one line naming --batch-size and half the size, exit 2; the
    same command with that size goes on from the rows already written, to the same views and features (up to the
    float16 rounding of another batch shape)."""
    data = read_dataset(example_images)
    whole = extract_features(data, tmp_path / "whole.h5", tiny_vit, **OPTS | {"batch_size": 12})
    encode, calls = tiny_vit.model.encode_image, {"n": 0}

    def out_of_memory(x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return encode(x)

    monkeypatch.setattr(tiny_vit.model, "encode_image", out_of_memory)
    with pytest.raises(FastCoopError, match="out of GPU memory encoding 12 views per call: run the same command "
                                            "with --batch-size 6"):
        extract_features(data, tmp_path / "f.h5", tiny_vit, **OPTS | {"batch_size": 12})
    monkeypatch.setattr(tiny_vit.model, "encode_image", encode)
    with h5py.File(tmp_path / "f.h5.partial", "r") as f:
        assert f["train"].attrs["done"] > 0
    extract_features(data, tmp_path / "f.h5", tiny_vit, **OPTS | {"batch_size": 6})
    with FeatureCache(whole) as a, FeatureCache(tmp_path / "f.h5") as b:
        for split in ("train", "test"):
            torch.testing.assert_close(a.features(split), b.features(split), atol=2e-3, rtol=2e-3)
        assert a.identity() == b.identity()


def _workers_of(pid: int) -> list[int]:
    """The child processes of `pid` (its decoding workers), from /proc."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM to the group"])
def test_a_cache_stopped_with_its_workers_busy_resumes_at_once(tmp_path, how):
    """Decoding workers outlive a kill -9 of their command by seconds (until they notice). They must hold nothing
    the resume needs: not the output's lock (an flock would be inherited), not HDF5's lock on the partial file.
    A SIGTERM to the process group (what `timeout` and schedulers send) is a clean 'interrupted', exit 130, as
    Ctrl-C is, without the workers' deaths as tracebacks. The same command, started at once, resumes the file."""
    import signal
    import subprocess
    import sys
    import time

    from fastcoop.example import make_example_images
    from fastcoop.outputs import holder

    images = make_example_images(tmp_path / "imgs", train_per_class=4, test_per_class=1, size=48)
    out, partial = tmp_path / "f.h5", tmp_path / "f.h5.partial"
    command = [sys.executable, "-m", "fastcoop", "cache", str(images), "--out", str(out), "--model", "ViT-B-32",
               "--pretrained", "none", "--shots", "all", "--views", "3", "--batch-size", "2", "--workers", "2"]
    env = os.environ | {"HDF5_USE_FILE_LOCKING": "FALSE"}  # this test only: to watch the rows being written
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    _wait_for_rows(process, partial, 4)
    time.sleep(0.5)  # the workers have filled their queue and wait for the encoder
    workers = _workers_of(process.pid)
    assert workers, "the command ended before its workers started"
    if how == "kill -9":
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
        assert any(_alive(w) for w in workers)  # what made this a test: the workers still run ...
        assert holder(out) is None  # ... and hold no lock of the output
    else:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait() == 130
        err = process.stderr.read()
        assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err and "killed by" not in err
    locking = os.environ | {"HDF5_USE_FILE_LOCKING": "TRUE"}  # as a user's resume opens files
    resumed = subprocess.run(command, capture_output=True, text=True, env=locking)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr and out.is_file() and not partial.exists()
