"""Which backend runs an op: resolves ``impl`` and imports backend modules lazily (no work at import)."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from types import ModuleType

import torch

from .options import IMPLS

__all__ = ["resolve_impl", "backend_module", "device_guard", "triton_interpreter_on", "check_capability",
           "auto_linear_impl", "cublas_tf32"]

# dtypes each backend accepts for the big float inputs
_DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cpp_ok(kind: str) -> bool:
    """Is the compiled C++ backend (kind "cpu" / "cuda") loadable? Builds it on first use (cached)."""
    from . import _cpp_build

    return _cpp_build.cpu_available() if kind == "cpu" else _cpp_build.cuda_available()


def _cpp_error(kind: str) -> str:
    from . import _cpp_build

    err = _cpp_build.build_error() if kind == "cpu" else _cpp_build.cuda_build_error()
    return str(err or f"the {kind} extension is not available")


def _constant_under_compile(fn):
    """Same as ``torch.compiler.assume_constant_result``: Dynamo runs ``fn`` once at trace time and treats
    the result (the backend name) as a graph constant. That decorator only sets this marker but imports
    torch._dynamo (2-4 s) to do so; setting it here keeps ``import hero_kernels`` cheap.
    tests/test_api.py checks the marker is still what torch uses."""
    fn._dynamo_marked_constant = True
    return fn


#: bf16 kernels (bf16 ``tl.dot`` in the fused heads, bf16 loads / math in the row kernels) need Ampere.
_BF16_MIN_CC = (8, 0)


def _bf16_unsupported(device: torch.device, dtype: torch.dtype):
    """The compute capability (major, minor) of a CUDA ``device`` too old for bf16 kernels, else None."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    cc = tuple(torch.cuda.get_device_capability(device.index if device.index is not None else None))
    return cc if cc < _BF16_MIN_CC else None


def check_capability(impl: str, device: torch.device, dtype: torch.dtype, arg: str) -> None:
    """The compute-capability gate of the GPU backends (``triton``, ``cuda``; both ops): bf16 needs sm_80.
    Explicit impl: one line saying so (instead of a failure deep in the Triton compiler or nvcc's runtime)."""
    cc = _bf16_unsupported(device, dtype) if impl in ("triton", "cuda") else None
    if cc is not None:
        raise RuntimeError(f"impl={impl!r} with bfloat16 {arg} needs a GPU of compute capability 8.0 (Ampere) or "
                           f"newer, got sm_{cc[0]}{cc[1]}; use float16/float32 {arg}, or impl='torch' / 'auto'")


@_constant_under_compile
def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, arg: str = "logits") -> str:
    """Map ``impl`` (one of IMPLS) to a concrete backend for tensors on ``device``; raise if impossible."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        cc = _bf16_unsupported(device, dtype)
        if cc is not None:
            # Pre-Ampere GPU, bf16: no GPU backend can run it; the chunked torch path can (slower, say so once).
            warnings.warn(f"hero_kernels: bfloat16 {arg} on sm_{cc[0]}{cc[1]} (< sm_80): impl='auto' runs the "
                          "chunked torch path; float16 inputs would run the GPU kernels", RuntimeWarning,
                          stacklevel=3)
            impl = "torch"
        elif device.type == "cuda" and dtype in _DTYPES["triton"] and _has_triton():
            impl = "triton"
        elif device.type == "cpu" and _cpp_ok("cpu"):
            impl = "cpu"
        else:
            impl = "torch"
        return impl
    if impl == "triton":
        if not _has_triton():
            raise RuntimeError("impl='triton' needs the triton package (pip install 'hero-kernels[triton]')")
        if device.type != "cuda" and not triton_interpreter_on():
            raise ValueError(
                f"impl='triton' needs CUDA tensors, but {arg} is on {device}; move it to a GPU, use impl='cpu'/'torch', "
                "or set TRITON_INTERPRET=1 (before importing hero_kernels) to run the Triton interpreter on CPU"
            )
    elif impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"impl='cuda' needs CUDA tensors, but {arg} is on {device}")
        if not _cpp_ok("cuda"):
            raise RuntimeError(f"impl='cuda' is unavailable: {_cpp_error('cuda')}")
    elif impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"impl='cpu' needs CPU tensors, but {arg} is on {device}")
        if not _cpp_ok("cpu"):
            raise RuntimeError(f"impl='cpu' is unavailable: {_cpp_error('cpu')}")
    if dtype not in _DTYPES[impl]:
        raise TypeError(f"impl={impl!r} does not support {arg} dtype {str(dtype).replace('torch.', '')}")
    check_capability(impl, device, dtype, arg)
    return impl


#: impl="auto" on CUDA picks the cuBLAS-chunked CUDA path over Triton only when its plan models at least this
#: fraction faster (the headline fused head: the same modeled time, the Triton head's chunked designs running the
#: same cuBLAS GEMMs over 16-bit logits, so Triton; with the Triton forward forced fused: 97.9 vs 109.7 ms, 11%,
#: so CUDA; hero_loss's 3-GEMM path, whose impls differ only in the row kernels: < 0.1%, so Triton)
AUTO_CUDA_MARGIN = 0.02

@_constant_under_compile
def auto_linear_impl(N: int, D: int, V: int, dtype: torch.dtype, device: torch.device, has_bias: bool,
                     op: str = "linear_entropy_logprob") -> str:
    """``impl="auto"`` for the fused LM head on a CUDA device, where ``resolve_impl`` chose "triton": the
    GPU path whose launch plan models faster for this shape and GPU (``plan.fastest_linear_impl``: the
    Triton kernels or the cuBLAS-chunked CUDA backend), "triton" when the CUDA extension is unavailable.
    op "linear_hero_loss": the row kernels of hero_loss's 3-GEMM path (Triton's unless the CUDA ones model
    faster). fp32: priced with torch's cuBLAS TF32 setting (``cublas_tf32``: TF32 makes every cuBLAS GEMM a
    tensor-core one, the Triton kernels' own dots stay IEEE). The model is pure Python (no sync); cached per
    shape, device, op and that setting."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    tf32 = dtype == torch.float32 and cublas_tf32()
    return _auto_linear_impl(int(N), int(D), int(V), dtype, index, bool(has_bias), op, tf32)


def cublas_tf32() -> bool:
    """Does cuBLAS run fp32 matmuls on TF32 tensor cores now (``torch.backends.cuda.matmul.allow_tf32``, also
    set by ``torch.set_float32_matmul_precision("high")``)? Where that getter refuses because the legacy and
    the new (torch >= 2.9) TF32 APIs were mixed, the new one's ``fp32_precision``, which cuBLAS follows."""
    m = torch.backends.cuda.matmul
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return getattr(m, "fp32_precision", "ieee") == "tf32"


@functools.lru_cache(maxsize=1024)
def _auto_linear_impl(N: int, D: int, V: int, dtype: torch.dtype, index: int, has_bias: bool,
                      op: str = "linear_entropy_logprob", tf32: bool = False) -> str:
    from .backends import plan

    props = torch.cuda.get_device_properties(index)
    gpu = plan.gpu_spec(props.name, props.multi_processor_count, 10 * props.major + props.minor)
    _, t = plan.fastest_linear_impl(N, D, V, dtype, gpu, has_bias=has_bias, op=op, tf32=tf32)
    # CUDA only when it models clearly faster: a gain inside the (uncalibrated) model's error does not pay for
    # building the CUDA extension on first use (~1 min, as impl="auto" on CPU tensors builds the C++ one).
    faster = t["cuda"] < (1.0 - AUTO_CUDA_MARGIN) * t["triton"]
    return "cuda" if faster and _cpp_ok("cuda") else "triton"


def backend_module(impl: str, op: str) -> ModuleType:
    """hero_kernels.backends.<impl>.<op>, imported on first use."""
    return importlib.import_module(f"hero_kernels.backends.{impl}.{op}")


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device while a backend launches: Triton launches on the current device
    and its stream, so tensors on cuda:1 with cuda:0 current would otherwise run on the wrong GPU."""
    import contextlib

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
