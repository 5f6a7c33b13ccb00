"""The chunked GEMM backward shared by the GPU launchers of the fused LM head (Triton and CUDA backends).

Per chunk of C valid rows: logits [C, V] = h_c @ W.T (+ b) by one GEMM in the input dtype, the backend's row
kernel turns them into dz IN PLACE, then dh_c = dz @ W (one GEMM, fp32 accumulate, written once) and
dW += dz^T @ h_c (one GEMM with an fp32 C operand and beta = 1: the fp32 [V, D] accumulator is read and
written once per chunk, inside the GEMM's epilogue). C comes from a memory budget (``chunk_rows``).
Shapes: h [n, D], weight [V, D], dz [C, V] (input dtype), dW fp32 [V, D].
"""
from __future__ import annotations

from typing import List, Optional

from torch import Tensor

import torch

from hero_kernels.backends.plan import KernelLaunch

__all__ = ["as_dtype", "eager_peak_bytes", "chunk_rows", "accumulate_dw", "mm_into", "chunk_grads",
           "chunked_backward_plan",
           "compaction_plan", "CHUNK_MEMORY_SHARE", "CHUNK_MIN_ROWS"]

#: Chunk: extra memory <= this share of eager's peak (``eager_peak_bytes``) where possible ...
CHUNK_MEMORY_SHARE = 0.02
#: ... but at least this many rows, so the dW GEMM's fp32 read-modify-write of [V, D] per chunk (8 V D
#: bytes) stays under its 2 C V D FLOPs on an H100 (C >= 4 * 989e12 / 3.35e12 = 1181).
CHUNK_MIN_ROWS = 1280
#: The budget's chunk rows are rounded down to a multiple of this (GEMM tiles).
CHUNK_ALIGN = 256


_DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                "float16": torch.float16, "half": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def as_dtype(dtype) -> torch.dtype:
    """A plan's dtype argument (torch.dtype or a name such as "bf16" / "bfloat16") as a torch.dtype."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be bf16, fp16 or fp32 (a torch.dtype or its name), got {dtype!r}")
    return _DTYPE_NAMES[name]


def eager_peak_bytes(N: int, V: int, elem: int) -> int:
    """A LOWER bound of eager PyTorch's materialized peak for fwd+bwd of this op: the [N, V] logits in the
    input dtype, the fp32 log-softmax saved for backward and the fp32 gradient of the logits."""
    return N * V * (elem + 8)


def chunk_rows(n: int, D: int, V: int, elem: int, forced: Optional[int] = None) -> int:
    """Rows C per chunk for n valid rows. Extra memory per row: the [C, V] logits / dz buffer and the
    [C, D] hidden rows of the chunk (both in the input dtype)."""
    if forced is not None:
        return max(1, min(n, forced))
    c = int(CHUNK_MEMORY_SHARE * eager_peak_bytes(n, V, elem)) // ((V + D) * elem)
    c = max(CHUNK_MIN_ROWS, c - c % CHUNK_ALIGN)
    if c >= n:
        return max(1, n)
    # Even chunks (multiples of 16 rows): no short tail chunk whose dW pass would be memory-bound.
    chunks = -(-n // c)
    return min(c, -(-(-(-n // chunks)) // 16) * 16)


#: Does this torch run a 16-bit GEMM with an fp32 output (``out_dtype``; CUDA builds only)? Per call form:
#: "ok" = torch.mm(..., out_dtype), "addmm" = torch.addmm(C, ..., out_dtype, out=C). None = untried.
OUT_DTYPE_MM = {"ok": None, "addmm": None}


def _out_dtype_call(key: str, fn) -> bool:
    """Run ``fn`` (a GEMM with out_dtype=float32) unless it is known not to work; False where torch lacks
    it (argument checks fail before any write). An error after a first success is a real error."""
    if OUT_DTYPE_MM.get(key) is False:
        return False
    try:
        fn()
    except (RuntimeError, TypeError, NotImplementedError):
        if OUT_DTYPE_MM.get(key):
            raise
        OUT_DTYPE_MM[key] = False
        return False
    OUT_DTYPE_MM[key] = True
    return True


def accumulate_dw(dW: Tensor, dz: Tensor, h: Tensor, slice_rows: int = 16384) -> None:
    """dW (fp32 / fp64) += dz^T @ h without rounding partial sums to dz's dtype. dz [C, V], h [C, D].

    16-bit inputs: one cuBLAS GEMM with bf16 / fp16 operands and the fp32 dW as C (beta = 1, fp32 output;
    ``torch.addmm(..., out_dtype=float32, out=dW)``). Where torch lacks ``out_dtype`` (CPU builds) the
    operands are upcast ``slice_rows`` vocab rows at a time (correct, slower; bounded extra memory).
    """
    if dz.dtype == dW.dtype:
        dW.addmm_(dz.t(), h.to(dW.dtype))
        return
    if dW.dtype == torch.float32 and _out_dtype_call(
            "addmm", lambda: torch.addmm(dW, dz.t(), h, out_dtype=torch.float32, out=dW)):
        return
    h_up = h.to(dW.dtype)
    for v0 in range(0, dW.shape[0], slice_rows):
        dW[v0:v0 + slice_rows].addmm_(dz[:, v0:v0 + slice_rows].t().to(dW.dtype), h_up)


def mm_into(a: Tensor, b: Tensor, out: Tensor, slice_rows: int = 16384) -> None:
    """out = a @ b with fp32 accumulation, written once in out.dtype (a 16-bit GEMM straight into an fp32
    ``out`` where torch offers ``out_dtype``; else upcast operands, ``slice_rows`` rows of a at a time)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and _out_dtype_call(
            "ok", lambda: torch.mm(a, b, out_dtype=torch.float32, out=out)):
        return
    else:
        b_up = b.to(out.dtype)
        for r0 in range(0, a.shape[0], slice_rows):
            torch.mm(a[r0:r0 + slice_rows].to(out.dtype), b_up, out=out[r0:r0 + slice_rows])


def chunk_grads(dz: Tensor, h_c: Tensor, weight: Tensor, dh: Optional[Tensor], dW: Optional[Tensor],
                db: Optional[Tensor], first: bool) -> None:
    """The GEMM half of one chunk: dh = dz @ W (written once into the chunk's rows ``dh``), dW (+)= dz^T h_c and
    db (+)= column sums of dz, in fp32; ``first``: the first chunk writes dW / db (beta = 0, no zero-fill pass).
    dz [C, V] and h_c [C, D] in the input dtype, weight [V, D]; None skips a gradient."""
    if dh is not None:
        mm_into(dz, weight, dh)
    if dW is not None:
        mm_into(dz.t(), h_c, dW) if first else accumulate_dw(dW, dz, h_c)
    if db is not None:
        torch.sum(dz, 0, dtype=torch.float32, out=db) if first else db.add_(dz.sum(0, dtype=torch.float32))


def chunked_backward_plan(n: int, D: int, V: int, elem: int, C: int, dz_launches, *, has_bias: bool,
                          need_dh: bool, need_dw: bool, dw_zeroed: bool = False) -> List[KernelLaunch]:
    """Plan of the chunked backward for n valid rows in chunks of C (equal chunks repeated, then the tail).

    dz_launches(c, reps) -> the backend's launches that leave dz [c, V] (input dtype) in the chunk buffer.
    dw_zeroed: the launcher zero-fills dW first, so every chunk's dW GEMM accumulates.
    Byte model: the [C, V] chunk (C V e bytes, ~0.4 GB at the flagship shape) is far beyond 50 MB of L2, so
    each GEMM reading it reads it from HBM; W [V, D] is streamed once per GEMM that reads it; the fp32 dW
    is read and written once per chunk inside the dW GEMM (beta = 1), written once by the first chunk.
    """
    out: List[KernelLaunch] = []
    note = ("cuBLAS: operands streamed once per GEMM (its tile swizzle keeps reuse in L2); the [C, V] chunk "
            "does not fit in 50 MB of L2")
    sizes = [(C, n // C)] + ([(n % C, 1)] if n % C else [])
    first = not dw_zeroed
    for c, reps in sizes:
        if reps == 0:
            continue
        cv = c * V * elem
        out += dz_launches(c, reps)
        if need_dh:
            out.append(KernelLaunch("cublas_dh", (), "gemm", 2.0 * c * D * V, cv + V * D * elem + c * D * 4,
                                    note, meta={"chunk_rows": c}, external=True, repeats=reps))
        if need_dw:
            # The first chunk writes dW (beta = 0): 4 V D bytes; every later one reads and writes it.
            for r, acc in ((1, not first), (reps - 1, True)):
                if r:
                    out.append(KernelLaunch("cublas_dw", (), "gemm", 2.0 * c * D * V,
                                            cv + c * D * elem + (8 if acc else 4) * V * D,
                                            note + "; fp32 dW in the GEMM's epilogue", meta={"chunk_rows": c},
                                            external=True, repeats=r))
            if has_bias:
                out.append(KernelLaunch("db_sum", (), "stream", 0.0, cv + 8 * V, "column sums of the chunk",
                                        external=True, repeats=reps))
        first = False
    if need_dw and elem != 4:
        out.append(KernelLaunch("dw_cast", (), "stream", 0.0, V * D * (4 + elem), "fp32 dW -> weight dtype",
                                external=True))
    return out


def compaction_plan(total_rows: Optional[int], n: int, D: int, elem: int, pass_: str) -> List[KernelLaunch]:
    """What the fused heads' masked-row compaction costs when ``total_rows`` > n (n valid rows kept): one
    ``nonzero`` over the labels (a host sync: the grids depend on n), gathers of the valid rows' hidden
    states and labels, and the scatter of the results back to [total_rows] (forward: logp, H, lse; backward:
    the per-row stats gathered, dh [n, D] scattered into a zero-filled [total_rows, D]). Nothing when every
    row is valid (or total_rows is None: the caller did not say)."""
    if total_rows is None or total_rows <= n:
        return []
    N = total_rows
    note = "masked-row compaction (torch ops): every byte once through HBM"
    out = [KernelLaunch("compact_rows", (), "stream", 0.0, 8 * N + 8 * n, note + "; nonzero syncs the host",
                        external=True, host_sync=True),
           KernelLaunch("gather_rows", (), "stream", 0.0, 2 * n * D * elem + 16 * n, note + "; hidden + labels",
                        external=True)]
    if pass_ == "fwd":
        out.append(KernelLaunch("scatter_outputs", (), "stream", 0.0, 3 * (4 * N + 8 * n), note + "; logp, H, lse",
                                external=True))
    else:
        out.append(KernelLaunch("gather_stats", (), "stream", 0.0, 5 * 8 * n, note + "; lse, H, g, k, logp",
                                external=True))
        out.append(KernelLaunch("scatter_dh", (), "stream", 0.0, (N + 2 * n) * D * elem,
                                note + "; zero-filled [N, D] + index_copy of dh", external=True))
    return out
