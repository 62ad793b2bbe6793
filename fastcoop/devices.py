"""Device and precision choices shared by every command."""

import re

import torch

from fastcoop.errors import FastCoopError


def resolve_device(device: str) -> str:
    """'auto' → cuda when a GPU is visible, else cpu; an explicit cuda without a GPU is an error."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise FastCoopError(f"unknown --device '{device}': use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FastCoopError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
