"""The methods beside CoOp as a user waits for them. The prompt learners (KgCoOp, ProGrad): whole `fastcoop
train` processes at CoOp's shape (the same context words, epochs and batch size, on one dataset-shaped cache), so
that the difference is each method's own part alone, against the published step's estimate (steps × the published
CoOp step, which KgCoOp's adds a penalty to and ProGrad's a second image-encoder pass for its teacher: a lower
bound for those two). The methods on image features (CLIP-Adapter, TaskRes, ZS-LP, CLAP, LP++): whole runs of
their published recipes, against the image encoding their published code does (CLIP-Adapter and TaskRes: every
epoch's batches of augmented images; ZS-LP and CLAP: 20 passes over the training images, LP++ one, before
training on their features), estimated as those images × the image encoder's time per image measured here. Tip-Adapter and -F: the whole `fastcoop tip-adapter --finetune`
on a dataset-shaped cache with val and test splits, against the published search's estimate."""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import median_ms
from benchmarks.full_run import FEATURE_DIM, run_fastcoop_train, write_synthetic_cache
from fastcoop.methods.tip_adapter import tip_recipe

SAME_SHAPE = ("--init", "a photo of a", "--batch-size", "32")  # KgCoOp's context; CoOp's batch


PROMPT_LEARNERS = {"coop": (), "kgcoop": (), "prograd": ("--n-ctx", "4")}  # ProGrad's words fill M = 4
ON_FEATURES = ("clip-adapter", "taskres", "zs-lp", "clap", "lp++")
PASSES = {"zs-lp": 20, "clap": 20, "lp++": 1}  # passes of the image encoder over the training images, up front


def run_methods_section(dataset: str, device: str, epochs: int, published_step_ms: float | None,
                        image_ms: float | None) -> list[dict]:
    """One row per method: the whole process, its loop and the loop's time per step after the first epoch, and the
    published code's estimate (`published_step_ms`: CoOp's published step; `image_ms`: the image encoder's time
    per image)."""
    rows = []
    for method in (*PROMPT_LEARNERS, *ON_FEATURES):
        schedule = ("--epochs", str(epochs), *SAME_SHAPE, *PROMPT_LEARNERS[method]) if method in PROMPT_LEARNERS \
            else ()  # the others: their published recipe
        run = run_fastcoop_train(dataset, device, options=("--method", method, *schedule))
        if method in PROMPT_LEARNERS:
            estimate = published_step_ms and run["steps"] * published_step_ms / 1000
        else:
            batch = {"clip-adapter": 32, "taskres": 256}.get(method, 0)  # per step, where it encodes per step
            images = PASSES[method] * 16 * run["classes"] if method in PASSES else run["steps"] * min(
                batch, 16 * run["classes"])
            estimate = image_ms and images * image_ms / 1000
        rows.append({"method": method, "dataset": dataset, "classes": run["classes"], "epochs": run["epochs"],
                     "steps": run["steps"], "process_seconds": run["process_seconds"],
                     "loop_seconds": run["loop_seconds"], "loop_ms_per_step": run["loop_ms_per_step"],
                     "published_estimate_seconds": estimate})
    coop = rows[0]["loop_ms_per_step"]
    for row in rows:  # a step of the methods that encode no text is another thing: not compared
        row["per_step_vs_coop"] = row["loop_ms_per_step"] / coop if coop and row["loop_ms_per_step"] and \
            row["method"] in PROMPT_LEARNERS else None
        print(f"  methods {dataset} {row['method']}: process {row['process_seconds']:.1f} s, loop "
              f"{row['loop_seconds']:.1f} s, {row['loop_ms_per_step'] or 0:.1f} ms per step "
              f"({row['per_step_vs_coop'] or 0:.2f}× CoOp's)", flush=True)
    return rows


def image_encoder_ms(device: str, repeats: int, batch: int = 32) -> float:
    """The image encoder's time per image (ViT-B/16, random weights, its published precision: fp16 on a GPU),
    on a batch of random 224 × 224 images."""
    from fastcoop.models import load_model

    loaded = load_model("ViT-B-16", "none", device)
    images = torch.randn(batch, 3, 224, 224, device=device)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32

    def encode():
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loaded.model.encode_image(images)

    return median_ms(encode, device, repeats) / batch


# CoOp's splits of Caltech101 and ImageNet hold about this many val and test images per class
EVAL_PER_CLASS = {"caltech101": {"val": 16, "test": 25}, "imagenet": {"val": 50, "test": 50}}
TIP_VIEWS = 31  # the keys' 10 views and -F's 20 epochs of fresh ones, after the eval view


def run_tip_adapter_row(dataset: str, device: str, repeats: int) -> dict:
    """The whole `fastcoop tip-adapter --finetune` on a 16-shot cache shaped like `dataset`'s, and the published
    search's estimate: utils.search_hp recomputes the affinities, their exponentials and both products for every
    one of the grid's settings, so one setting timed on the same shapes, × the grid, × 2 (Tip-Adapter, then -F)."""
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / f"{dataset}.h5"
        k = write_synthetic_cache(cache, dataset, shots=16, seeds=[1], views=TIP_VIEWS,
                                  eval_per_class=EVAL_PER_CLASS[dataset])
        command = [sys.executable, "-m", "fastcoop", "tip-adapter", str(cache), "--shots", "16", "--seed", "1",
                   "--finetune", "--device", device, "--out", str(Path(tmp) / "tip.json")]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        result = json.loads((Path(tmp) / "tip.json").read_text())
    recipe = tip_recipe(dataset)
    betas, alphas = recipe.grid()
    features = F.normalize(torch.randn(k * EVAL_PER_CLASS[dataset]["val"], FEATURE_DIM["ViT-B-16"], device=device),
                           dim=-1)
    keys = F.normalize(torch.randn(FEATURE_DIM["ViT-B-16"], k * 16, device=device), dim=0)
    values = F.one_hot(torch.arange(k, device=device).repeat_interleave(16), k).float()
    clip_weights = F.normalize(torch.randn(FEATURE_DIM["ViT-B-16"], k, device=device), dim=0)

    def one_setting(beta=1.0, alpha=1.0):  # the published loop's body, as utils.search_hp writes it
        affinity = features @ keys
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
        clip_logits = 100. * features @ clip_weights
        return (clip_logits + cache_logits * alpha).argmax(dim=-1)

    setting_ms = median_ms(one_setting, device, repeats)
    row = {"method": "Tip-Adapter + Tip-Adapter-F", "dataset": dataset, "classes": k, "keys": k * 16,
           "val_images": len(features), "process_seconds": wall, "published_setting_ms": setting_ms,
           "published_search_estimate_seconds": 2 * len(betas) * len(alphas) * setting_ms / 1000,
           "grid": [len(betas), len(alphas)], "epochs_f": result["tip_adapter_f"]["epochs"]}
    print(f"  methods {dataset} Tip-Adapter + -F: whole command {wall:.1f} s; the published search alone "
          f"≈ {row['published_search_estimate_seconds']:.0f} s ({setting_ms:.1f} ms × "
          f"{len(betas)} × {len(alphas)} × 2)", flush=True)
    return row
