"""What the Triton kernels share: whether they run interpreted, a dot product that stays right when they do and
its precision by dtype, the MLP activations, how many programs fill the device, and how they are launched
(launch_kernel: run, or compiled side by side inside compiling_in_parallel).

Every kernel leaves its size arguments that follow the data (rows, classes, segments, splits, and heads, which
stacked runs multiply) out of Triton's specialisation (`do_not_specialize`): Triton would otherwise compile a variant for each size that is 1 or a
multiple of 16, so a dataset of another size could miss a warm kernel cache. Feature widths and strides, fixed by
the model, stay specialised (their multiples of 16 give vectorised loads)."""

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by Triton when a kernel is defined, so here too
_compile_only: ContextVar[bool] = ContextVar("fastcoop_compile_only", default=False)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter only: its bf16 dot is broken) multiplies in fp32,
    which equals the tensor-core result: products of bf16/fp16 values are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def dot_precision(dtype: torch.dtype) -> str:
    """mma's PRECISION for inputs of this dtype: fp32 products stay fp32 (as PyTorch's matmuls by default), not
    tf32; bf16/fp16 products are exact in fp32 either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def activation(h, QUICK: tl.constexpr):
    """Exact GELU, or QuickGELU x·σ(1.702·x) (OpenAI's CLIP), of an fp32 tile."""
    if QUICK:
        return h * tl.sigmoid(1.702 * h)
    return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def activation_derivative(h, QUICK: tl.constexpr):
    """d activation / dh of an fp32 tile, in the formulas PyTorch's backward kernels use."""
    if QUICK:
        s = tl.sigmoid(1.702 * h)
        return s + 1.702 * h * s * (1.0 - s)
    cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
    return cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327  # Φ(h) + h·φ(h)


def multiprocessors(device: torch.device) -> int:
    """The GPU's multiprocessors; without a GPU (the interpreter) a stand-in of four."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def target_programs(device: torch.device) -> int:
    """About four programs per multiprocessor: enough to fill the GPU, few enough that each does real work."""
    return 4 * multiprocessors(device)


def launch_kernel(kernel, grid, *args, **options) -> None:
    """kernel[grid](*args, **options), as every fastcoop kernel is launched; inside compiling_in_parallel() the
    kernel is compiled for these arguments, and nothing runs."""
    if _compile_only.get():
        kernel.run(*args, grid=grid, warmup=True, **options)
    else:
        kernel[grid](*args, **options)


@contextmanager
def compiling_in_parallel(device: torch.device):
    """Inside, each kernel launch starts compiling its kernel in a pool of threads (Triton's AsyncCompileMode)
    instead of running it; leaving waits until every kernel is compiled and cached. Triton compiles a kernel at its
    first launch, one after another; its compiler releases the GIL, so threads compile side by side. What runs
    inside reads kernel outputs never written: run it for its launches alone, on state the caller restores. The
    interpreter has nothing to compile (nothing runs either); without AsyncCompileMode (Triton < 3.4) launches run
    as usual."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        yield
        return
    on_device = dict(initializer=torch.cuda.set_device, initargs=(device,)) if device.type == "cuda" else {}
    with ThreadPoolExecutor(min(32, os.cpu_count() or 1), **on_device) as pool, AsyncCompileMode(pool):
        token = _compile_only.set(True)
        try:
            yield
        finally:
            _compile_only.reset(token)
