"""CUDA fused entropy + log-prob rows: launchers over torch.ops.hero_kernels_cpp (no autograd here).

Kernels in csrc/entropy_logprob_cuda.cu: one block per row, asynchronous on the current stream, one launch
for [N, V] and for [B, T, V] views of any batch stride. ``plan`` is the single source of the block size
(threads per row) and grid; the launchers pass its choice to the C++ launcher.

forward(logits [N, V] or [B, T, V], labels, opts) -> (logp, H, lse), each fp32 [N]
backward(logits, labels, saved: RowStats, grads: UpstreamGrads, opts, out=None) -> dlogits (shape of logits) in
    logits.dtype (saved.lse, saved.H and grads.g, grads.k: [N])

logits: last-dim stride 1, any row / batch stride; bf16 / fp16 / fp32 (fp64 is refused). Masked rows (label ==
opts.ignore_index) give 0 outputs and 0 gradient; a label outside [0, V) a NaN row (no host sync). ``out``
may be ``logits`` itself (in-place backward), or a float32 tensor of its shape (the fused LM-head path).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import Tensor

from hero_kernels._cpp_build import require_cuda
from hero_kernels.backends import RowStats, UpstreamGrads
from hero_kernels.backends.cpp_launch import rows_backward, rows_forward
from hero_kernels.backends.plan import KernelLaunch, ctas_per_sm, load_bytes_per_thread, sass_per_element
from hero_kernels.dispatch import check_capability
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "plan", "threads_per_row", "BATCHED"]

#: forward / backward take a [B, T, V] view of any batch stride in one launch.
BATCHED = True

_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}
_CXX_TYPES = {"bf16": "__nv_bfloat16", "fp16": "__half", "fp32": "float"}  # template argument of the kernels
_NAMES = {"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16", "half": "fp16",
          "float32": "fp32", "fp32": "fp32", "float": "fp32"}
#: the grid-stride row loop caps the grid at gridDim.x's limit
_GRID_CAP = 2**31 - 1


def _dtype_name(dtype) -> str:
    name = _NAMES.get(str(dtype).replace("torch.", ""))
    if name is None:
        raise TypeError(f"dtype must be bfloat16, float16 or float32 for the cuda backend, got {dtype!r}")
    return name


def threads_per_row(V: int, elem_bytes: int) -> int:
    """Threads of one row block from the row's 16-byte vectors: 512 for LM vocabularies (nvec >= 8192: two
    16-byte loads in flight per thread; bf16 on sm_90a the forward takes 48 registers and the backward 62, so
    2 blocks = 1024 threads and 32 KB of loads in flight per SM: compile report), fewer for short rows
    (few idle threads). Mirrors csrc/entropy_logprob_cuda.cu:threads_for, which only applies when 0 is passed."""
    nvec = V // (16 // elem_bytes)
    return 128 if nvec < 1024 else 256 if nvec < 8192 else 512


def plan(N: int, V: int, dtype, *, pass_: str = "fwd", inplace_backward: bool = False,
         batch: Optional[int] = None) -> List[KernelLaunch]:
    """Launches of the CUDA row kernels on N rows (``batch`` = B of a [B, T, V] view: still one launch), in
    order; pass_ "fwd", "bwd" or "fwd+bwd". HBM bytes as the Triton plan: the forward reads every logit once,
    the backward reads it and writes dlogits once (logits dtype; in place the write lands in the logits);
    rows are streamed, nothing is assumed L2-resident. meta["sass_per_elt"]: the measured hot-loop SASS
    instructions per element of the template instance that runs (``hero_kernels.backends.sass_counts``);
    meta["bytes_in_flight_per_sm"]: threads x the bytes each loads per hot-loop iteration x resident blocks per SM,
    both measured on that instance (``plan.load_bytes_per_thread`` / ``plan.ctas_per_sm``), over meta["load_bytes"]
    (the stores excluded): the roofline's latency term."""
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_!r}")
    e = _ELEM[_dtype_name(dtype)]
    threads = threads_per_row(V, e)
    grid = (min(N, _GRID_CAP),)
    T = _CXX_TYPES[_dtype_name(dtype)]

    def meta(kernel: str) -> dict:  # the demangled template instance (dlogits in the logits dtype)
        key = f"cuda:entropy_logprob_{kernel}_kernel<{T}, {threads}>" if kernel == "fwd" else \
            f"cuda:entropy_logprob_bwd_kernel<{T}, {T}, {threads}>"
        ctas, per_thread = ctas_per_sm(key), load_bytes_per_thread(key)
        return {"threads": threads, "batch": int(batch or 1), "elements": N * V,
                "sass_per_elt": sass_per_element(key), "sass_build": key, "ctas_per_sm": ctas,
                "bytes_in_flight_per_sm": threads * per_thread * ctas if ctas and per_thread else None}

    note = "stream: every logit crosses HBM once per kernel (rows are not reused; no L2 residency assumed)"
    out = []
    if pass_ in ("fwd", "fwd+bwd"):
        out.append(KernelLaunch("entropy_logprob_fwd_kernel", grid, "stream", 0.0, float(N) * (V * e + 8 + 16), note,
                                num_warps=threads // 32, meta=dict(meta("fwd"), load_bytes=float(N) * (V * e + 8))))
    if pass_ in ("bwd", "fwd+bwd"):
        out.append(KernelLaunch("entropy_logprob_bwd_kernel", grid, "stream", 0.0, float(N) * (2 * V * e + 8 + 20),
                                note + ("; dlogits written over the logits (in place)" if inplace_backward else ""),
                                num_warps=threads // 32, meta=dict(meta("bwd"), INPLACE=int(bool(inplace_backward)),
                                                                   load_bytes=float(N) * (V * e + 28))))
    return out


def _launch(logits: Tensor, labels: Tensor, pass_: str) -> Tuple[int, int]:
    """(threads per row block, row blocks) of the plan: the C++ launcher launches exactly these."""
    check_capability("cuda", logits.device, logits.dtype, "logits")
    B = logits.shape[0] if logits.dim() == 3 else None
    (k,) = plan(labels.numel(), logits.shape[-1], logits.dtype, pass_=pass_, batch=B)
    return k.meta["threads"], k.grid[0]


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> RowStats:
    return rows_forward(require_cuda(), logits, labels, opts, *_launch(logits, labels, "fwd"))


def backward(logits: Tensor, labels: Tensor, saved: RowStats, grads: UpstreamGrads, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    return rows_backward(require_cuda(), logits, labels, saved, grads, opts, out, *_launch(logits, labels, "bwd"))
