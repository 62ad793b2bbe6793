"""Frozen CLIP-like models from open_clip: architecture by name (or a JSON config), weights by tag, path or none."""

import contextlib
import difflib
import json
import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import open_clip
import torch
from safetensors import safe_open

from fastcoop.errors import FastCoopError


@dataclass
class LoadedModel:
    """An open_clip model with its eval transform and tokenizer, and the names that identify its weights."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    name: str  # open_clip architecture name, or the absolute path of its JSON config
    pretrained: str  # "none", an open_clip tag, or an absolute checkpoint path

    @property
    def random_init(self) -> bool:
        return self.pretrained == "none"


def resolve_model_name(model: str) -> str:
    """Accept an open_clip architecture name, or a path to an open_clip-style JSON config (registered on the fly)."""
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise FastCoopError(f"model config {model} does not exist")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FastCoopError(f"model config {model} is not a JSON file ({exc})") from None
        if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
            raise FastCoopError(f"model config {model} is no open_clip model config (it needs embed_dim, "
                                "vision_cfg and text_cfg)")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise FastCoopError(f"unknown model '{model}'{hint}; see open_clip.list_models() or pass a JSON config path")
    return model


def resolve_pretrained(model_name: str, pretrained: str | None) -> str:
    """Normalise --pretrained to 'none', an absolute checkpoint path, or a tag open_clip knows for this model."""
    if pretrained is None or pretrained.lower() == "none":
        return "none"
    path = Path(pretrained).expanduser()
    if path.exists():
        return str(path.resolve())
    if any(sep in pretrained for sep in "/\\") or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FastCoopError(f"checkpoint file {pretrained} does not exist")
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none are published"
        raise FastCoopError(
            f"'{pretrained}' is not an open_clip weight tag for {model_name} (known: {known}); "
            "pass a local checkpoint path or 'none'")
    return pretrained


def trained_with_quick_gelu(model_name: str, tag: str) -> bool:
    """Whether an open_clip weight tag was trained with QuickGELU (OpenAI's CLIP weights, CoOp's, are). open_clip
    builds e.g. 'ViT-B-16' with exact GELU and only warns when such weights are loaded into it, which changes
    every feature; a local checkpoint says nothing about it (use the '-quickgelu' architecture for OpenAI's)."""
    return tag != "none" and not Path(tag).exists() and bool(
        open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers within `timeout` s, asked once through huggingface_hub's own HTTP
    client (its proxies, endpoint and certificates), without its retries."""
    try:
        huggingface_hub.get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
        return True
    except Exception:  # any failure to connect: not reachable now
        return False


def weights_file(name: str, tag: str) -> str:
    """The local file of a checkpoint path or an open_clip weight tag: found in the Hugging Face cache without a
    request (an offline machine answers at once), else fetched by huggingface_hub (open_clip's download) after
    one quick look that the hub answers. Nothing process-wide is changed; HF_HUB_OFFLINE=1 is honoured."""
    if Path(tag).exists():
        return tag
    cfg = open_clip.get_pretrained_cfg(name, tag)
    cached = _in_hub_cache(cfg)
    if cached:
        return cached
    if cfg.get("hf_hub") and (huggingface_hub.constants.HF_HUB_OFFLINE or not hub_reachable()):
        raise FastCoopError(
            f"could not load weights '{tag}' for {name}: they are not in the local Hugging Face cache and "
            f"{huggingface_hub.constants.ENDPOINT} cannot be reached (offline, or HF_HUB_OFFLINE is set); download "
            "the checkpoint elsewhere and pass its path with --pretrained")
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as exc:  # the hub's or the URL's own failure, as one line
        reason = textwrap.shorten((str(exc).splitlines() or [type(exc).__name__])[0], 200)
        raise FastCoopError(f"could not load weights '{tag}' for {name} ({reason})") from exc


def _in_hub_cache(cfg: dict) -> str | None:
    """A tag's file already in the Hugging Face cache, looked for as open_clip names it (its safetensors first)."""
    hub = cfg.get("hf_hub")
    if not hub:
        return None
    repo, filename = os.path.split(hub)  # "org/model/" means open_clip's default file name
    for candidate in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
        found = huggingface_hub.try_to_load_from_cache(repo, candidate)
        if isinstance(found, str):
            return found
    return None


def _why_unreadable(exc: Exception) -> str:
    """What went wrong reading a checkpoint, in a few words: torch's safe loader's refusal says what it met
    (without its advice to load unsafely); anything else, its first line."""
    text = str(exc)
    if "Weights only load failed" in text:
        met = " ".join(text.partition("WeightsUnpickler error:")[2].split("Check the documentation")[0].split())
        return f"not a file of weights torch loads safely ({met or 'unreadable'})"
    return textwrap.shorten((text.splitlines() or [type(exc).__name__])[0], 200)


def load_model(model: str = "ViT-B-16", pretrained: str | None = "openai", device: str | torch.device = "cpu",
               image_tower: bool = True) -> LoadedModel:
    """Create the model in fp32 with every parameter frozen, with the activation its weights were trained with;
    mixed precision is applied by autocast where used. image_tower=False, for work on cached image features: with
    weights from a checkpoint, the image tower's tensors stay unread and unallocated (on the meta device)."""
    name = resolve_model_name(model)
    tag = resolve_pretrained(name, pretrained)
    spec = str(Path(model).resolve()) if model.endswith(".json") else name
    file = None if tag == "none" else weights_file(name, tag)
    muted = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs each failure; the one line below says it
    try:
        net, preprocess = _build(name, tag, file, device, image_tower)
    except Exception as exc:  # a checkpoint that cannot be read becomes one clear line
        raise FastCoopError(f"could not read checkpoint {file} for {name}: {_why_unreadable(exc)}") from exc
    finally:
        logging.disable(muted)
    net.eval().requires_grad_(False)
    return LoadedModel(net, preprocess, open_clip.get_tokenizer(name), spec, tag)


def _build(name: str, tag: str, file: str | None, device, image_tower: bool = True
           ) -> tuple[torch.nn.Module, object]:
    """The model and its eval transform. A model whose weights come from a checkpoint is built on the meta device
    and then filled from the checkpoint: its random initialisation, most of the time of building it and all
    overwritten by the load, is skipped; without image_tower, only the rest is filled (_load_all_but_image_tower),
    where the checkpoint allows. The causal attention masks, the only tensors a checkpoint does not hold, are
    rebuilt. Built the plain way: random init, towers from timm or Hugging Face (_own_towers), models with other
    unsaved tensors, and big_vision .npz checkpoints (their loader assigns only some tensors). `file`: the
    weights (weights_file), None for random init; the tag still gives the transform and the activation."""
    quick_gelu = trained_with_quick_gelu(name, tag)
    if tag != "none" and not tag.endswith((".npz", ".npy")) and _own_towers(name):
        with torch.device("meta"):
            net, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=tag, load_weights=False, device="meta", force_quick_gelu=quick_gelu)
        masks = _causal_mask_buffers(net)
        if masks is not None:
            if image_tower or not _load_all_but_image_tower(net, file, device):
                net.to_empty(device=device)
                open_clip.load_checkpoint(net, file, strict=True)
            for module, buffer in masks:
                getattr(module, buffer).fill_(float("-inf")).triu_(1)  # as open_clip's build_causal_mask
            return net, preprocess
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init is reproducible: a cache and a run made with 'none' agree
        net, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=None if tag == "none" else tag, load_weights=False, device=device,
            force_quick_gelu=quick_gelu)
    if file is not None:
        open_clip.load_checkpoint(net, file, strict=True)
    return net, preprocess


def _load_all_but_image_tower(net: torch.nn.Module, file: str, device) -> bool:
    """Fill a meta-built model's tensors outside its image tower from a checkpoint, reading only theirs; the image
    tower stays on the meta device. Only for a safetensors or torch file holding exactly the model's tensors under
    its own names and shapes (as open_clip saves a model); False, with nothing done, for any other, which
    open_clip's loader reads whole (it converts other layouts)."""
    state = net.state_dict()
    wanted = {key: t for key, t in state.items() if not key.startswith("visual.")}
    with contextlib.ExitStack() as stack:
        if file.endswith(".safetensors"):
            opened = stack.enter_context(safe_open(file, "pt"))
            shapes = {key: tuple(opened.get_slice(key).get_shape()) for key in opened.keys()}
            read = opened.get_tensor
        else:  # a torch file, mapped: only the tensors looked at are read
            try:
                held = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception:  # not a file torch maps (an old or TorchScript one): open_clip reads it
                return False
            if not isinstance(held, dict) or not all(isinstance(t, torch.Tensor) for t in held.values()):
                return False
            shapes, read = {key: tuple(t.shape) for key, t in held.items()}, held.__getitem__
        if set(shapes) != set(state) or any(shapes[key] != tuple(t.shape) for key, t in wanted.items()):
            return False
        visual, net.visual = net.visual, None
        net.to_empty(device=device)
        net.visual = visual
        net.load_state_dict({key: read(key) for key in wanted}, strict=False)
    return True


def _own_towers(name: str) -> bool:
    """Whether both towers are open_clip's own modules: timm image towers and Hugging Face text towers build their
    own way, and may load base weights while being built."""
    cfg = open_clip.get_model_config(name) or {}
    return "timm_model_name" not in cfg.get("vision_cfg", {}) and "hf_model_name" not in cfg.get("text_cfg", {})


def _causal_mask_buffers(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str]] | None:
    """(module, name) of every buffer a checkpoint does not hold, if all are square causal masks ('attn_mask');
    None otherwise."""
    found = []
    for module in model.modules():
        for buffer in module._non_persistent_buffers_set:
            value = getattr(module, buffer)
            if value is None:
                continue
            if buffer != "attn_mask" or value.ndim != 2 or value.shape[0] != value.shape[1]:
                return None
            found.append((module, buffer))
    return found


def preprocess_config(model: torch.nn.Module) -> dict:
    """Image size, mean, std, interpolation and resize mode of the model's eval transform, as plain JSON values."""
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    size = list(size) if isinstance(size, (tuple, list)) else [size, size]
    return {
        "size": size,
        "mean": list(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        "std": list(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "resize_mode": cfg.get("resize_mode", "shortest"),
    }


def move_text_tower(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """Move everything but the image tower: training on cached features never runs it, so it need not take
    accelerator memory."""
    visual = model.visual
    model.visual = None
    model.to(device)
    model.visual = visual
    return model
