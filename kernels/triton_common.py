"""What the Triton kernels share: whether they run interpreted, a dot product that stays right when they do, and
how many programs fill the device."""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton when a kernel is defined, so here too


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only: its bf16 dot is broken) multiplies in fp32,
    which equals the tensor-core result: products of bf16/fp16 values are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors; without a GPU (the interpreter) a stand-in of four."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def target_programs(device: torch.device) -> int:
    """About four programs per multiprocessor: enough to fill the GPU, few enough that each does real work."""
    return 4 * multiprocessors(device)
