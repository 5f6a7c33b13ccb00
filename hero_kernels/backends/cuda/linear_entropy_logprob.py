"""CUDA fused LM head + entropy + log-prob: token chunks through cuBLAS (torch.matmul) into a bounded
[chunk, V] logits buffer, then the fused CUDA row kernels (csrc/entropy_logprob_cuda.cu).

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, opts) -> (logp, H, lse) fp32 [N]
backward(hidden, weight, bias, labels, saved: RowStats, grads: UpstreamGrads, opts)
    -> (grad_hidden [N, D] in hidden.dtype, grad_weight [V, D] in weight.dtype, grad_bias [V] | None)
    need_dh=False / need_dw=False (keywords): that gradient is None and GEMM 2 / GEMM 3 (with db and the
    fp32 grad_weight buffer) is skipped.
plan(N, D, V, dtype, *, pass_, has_bias, need_dh, need_dw, deterministic) -> list[KernelLaunch]: what the
    launchers run (chunk size included), for them and for ``benchmarks/roofline.py``, with the memory model
    (``live_bytes``). The backward's loop order comes from ``gemm.backward_order``: "vocab" slices where
    n < V (``cpp_launch.linear_vocab_backward``: the row kernel on each [n, Vc] slice between two
    one-thread-per-row launches that move the label into the slice and rewrite that column from the
    forward's logp, dW slices written once, no fp32 [V, D]: 0.42 GB = 2.0 % of eager's lower bound at
    N=16384, D=4096, V=128256 bf16, and 0.4 % faster than "rows" in the model there, fwd+bwd on an H100),
    else "rows" (below; 2.51 GB = 12 % there).

Per chunk the backward recomputes the logits (GEMM 1), turns them into dlogits IN PLACE with the row kernel,
then dh = dz @ W (GEMM 2) and dW += dz^T h (GEMM 3: cuBLAS with the fp32 grad_weight as its C operand,
beta = 1, ``hero_kernels.backends.gemm.accumulate_dw``; the first chunk writes it, beta = 0, so there is no
zero-fill pass). With the forward GEMM that is the 4-GEMM floor 8 N D V (docs/design.md section 5); the
chunk C comes from the memory budget of ``hero_kernels.backends.gemm.chunk_rows`` (<= 2% of eager's
materialized peak where that leaves >= 1280 rows), capped by CHUNK_BYTES. The row kernel's threads per row
come from ``cuda.entropy_logprob.threads_per_row`` (the row op's plan): one source for both ops' plans and
launches. Masked rows are compacted away first (``backends.compact_rows``: one host sync, ``nonzero``, per
call; none during CUDA graph capture, where the masked rows are computed and zeroed by the row kernel).
Deterministic (cuBLAS with a fixed configuration). No autograd here.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from hero_kernels._cpp_build import require_cuda
from hero_kernels.backends import RowStats, UpstreamGrads, compact_rows, gemm
from hero_kernels.backends.cpp_launch import linear_rows_backward, linear_rows_forward, linear_vocab_backward
from hero_kernels.backends.cuda import entropy_logprob as _rows
from hero_kernels.backends.plan import KernelLaunch
from hero_kernels.dispatch import check_capability
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "plan", "CHUNK_BYTES"]

#: Cap on the [chunk, V] logits buffer in bytes (the memory budget usually asks for less).
CHUNK_BYTES = 1 << 30

#: Vocab rows per upcast slice where torch has no fp32-output 16-bit GEMM (bounds that fallback's buffer).
DW_SLICE = 16384

_OUT_DTYPE_MM = gemm.OUT_DTYPE_MM  # which fp32-output 16-bit GEMM forms torch has here (None: untried)


def _chunk_rows(n: int, D: int, V: int, elem: int) -> int:
    rows = gemm.chunk_rows(n, D, V, elem)
    return max(1, min(rows, CHUNK_BYTES // max(V * elem, 1)))


def plan(N: int, D: int, V: int, dtype, *, pass_: str = "fwd", has_bias: bool = False, need_dh: bool = True,
         need_dw: bool = True, deterministic: bool = True, total_rows: Optional[int] = None,
         order: Optional[str] = None) -> List[KernelLaunch]:
    """Launches of ``pass_`` ("fwd", "bwd", "fwd+bwd") for N valid rows; the chunk rows are in each entry's
    meta["chunk_rows"]. The backward's loop order (``gemm.backward_order``: "vocab" slices where n < V,
    else "rows" chunks) comes from the memory model; ``order`` forces one. ``deterministic`` is accepted
    for a uniform signature: this path always is.
    The row-kernel entries are the row op's own plan (``cuda.entropy_logprob.plan``: block size, measured
    SASS per element) for a chunk. total_rows > N: the masked-row compaction's entries too."""
    if pass_ not in ("fwd", "bwd", "fwd+bwd"):
        raise ValueError(f"pass_ must be 'fwd', 'bwd' or 'fwd+bwd', got {pass_!r}")
    if order not in (None, "rows", "vocab"):
        raise ValueError(f"order must be None, 'rows' or 'vocab', got {order!r}")
    order_ = order
    e = torch.finfo(gemm.as_dtype(dtype)).bits // 8
    out: List[KernelLaunch] = []
    if N <= 0:
        return out
    C = _chunk_rows(N, D, V, e)

    def rows(pass_: str, c: int, reps: int) -> KernelLaunch:
        (k,) = _rows.plan(c, V, dtype, pass_=pass_, inplace_backward=pass_ == "bwd")
        return dataclasses.replace(k, l2_note=note, meta=dict(k.meta, chunk_rows=c), repeats=reps)

    note = "the [C, V] chunk (far beyond 50 MB of L2) is written by the GEMM and read once by the row kernel"
    if pass_ in ("fwd", "fwd+bwd"):
        out += gemm.compaction_plan(total_rows, N, D, e, "fwd")
        for c, reps in [(C, N // C)] + ([(N % C, 1)] if N % C else []):
            if reps:
                out.append(KernelLaunch("cublas_logits", (), "gemm", 2.0 * c * D * V,
                                        c * D * e + V * D * e + c * V * e, note, meta={"chunk_rows": c},
                                        external=True, repeats=reps))
                out.append(rows("fwd", c, reps))
    # Memory model of the forward: the [C, V] logits chunk and the chunk's hidden-row copy.
    out = [dataclasses.replace(k, live_bytes=C * (V + D) * e) for k in out]
    if pass_ == "fwd" or not (need_dh or need_dw):
        return out
    out += gemm.compaction_plan(total_rows, N, D, e, "bwd")

    def dz(c: int, reps: int) -> List[KernelLaunch]:
        # Logits GEMM into the chunk, then the row kernel turns them into dz in place (read + write).
        return [KernelLaunch("cublas_logits", (), "gemm", 2.0 * c * D * V, c * D * e + V * D * e + c * V * e,
                             note, meta={"chunk_rows": c}, external=True, repeats=reps),
                rows("bwd", c, reps)]

    order, _, Vc = gemm.backward_order(N, D, V, e, need_dh=need_dh, need_dw=need_dw, has_bias=has_bias,
                                       chunk_row_bytes=2 * D * e)
    order = order if order_ is None else order_
    if order == "vocab":
        copies = N * D * e if (total_rows is not None and total_rows > N) else 0  # the gathered valid rows
        memory = gemm.backward_memory("vocab", N, D, V, e, N, Vc, need_dh=need_dh, need_dw=need_dw,
                                      has_bias=has_bias, copies=copies)
        return out + gemm.vocab_backward_plan(N, D, V, e, N, Vc, _vocab_dz(dtype, D, e, note), has_bias=has_bias,
                                              need_dh=need_dh, need_dw=need_dw, dh_elem=e, memory=memory)
    # "rows": the [C, V] chunk, the chunk's hidden-row copy and dh product ([C, D] each), the fp32 dW [V, D]
    # and its cast.
    memory = gemm.backward_memory("rows", N, D, V, e, C, V, need_dh=need_dh, need_dw=need_dw, has_bias=has_bias,
                                  chunk_row_bytes=2 * D * e)
    return out + gemm.chunked_backward_plan(N, D, V, e, C, dz, has_bias=has_bias, need_dh=need_dh,
                                            need_dw=need_dw, memory=memory)


#: Threads per block of the "vocab" order's one-thread-per-row kernels (csrc/entropy_logprob_cuda.cu kSliceThreads).
SLICE_THREADS = 256


def _vocab_dz(dtype, D: int, e: int, note: str):
    """dz_launches of the "vocab" order: per slice, the logits GEMM over all n rows, the slice labels (and the
    label column's logit, saved before dz overwrites it), the row kernel in place on the [n, vc] slice (the row
    op's own plan at width vc), the label-column rewrite."""
    def dz(n: int, vc: int, reps: int) -> List[KernelLaunch]:
        (k,) = _rows.plan(n, vc, dtype, pass_="bwd", inplace_backward=True)
        meta = {"chunk_rows": n, "vocab_cols": vc, "order": "vocab"}
        labels, fix = gemm.slice_label_plan(("slice_labels_kernel", "slice_label_fix_kernel"), n,
                                            (-(-n // SLICE_THREADS),), SLICE_THREADS // 32, meta, reps)
        return [KernelLaunch("cublas_logits", (), "gemm", 2.0 * n * D * vc, n * D * e + vc * D * e + n * vc * e,
                             note, meta=meta, external=True, repeats=reps),
                labels, dataclasses.replace(k, l2_note=note, meta=dict(k.meta, **meta), repeats=reps), fix]
    return dz


def _step(rows: Optional[Tensor], labels: Tensor, weight: Tensor, pass_: str) -> Tuple[int, int]:
    """(chunk rows, row-kernel threads) from the plan for the rows ``compact_rows`` chose (no host sync here:
    the count is the index's length, or N when uncompacted)."""
    n = labels.numel() if rows is None else rows.numel()
    V, D = weight.shape
    rk = [x for x in plan(n, D, V, weight.dtype, pass_=pass_) if "threads" in x.meta]
    return (rk[0].meta["chunk_rows"], rk[0].meta["threads"]) if rk else (1, 0)


def forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions
) -> RowStats:
    check_capability("cuda", hidden.device, hidden.dtype, "hidden")
    rows = compact_rows(labels, opts.ignore_index)
    step, threads = _step(rows, labels, weight, "fwd")
    return linear_rows_forward(require_cuda(), hidden, weight, bias, labels, opts, step, threads, rows=rows)


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, saved: RowStats,
             grads: UpstreamGrads, opts: RowOptions, *, need_dh: bool = True,
             need_dw: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    # saved.logp: the "vocab" order's label column 1 - p_y (a slice is not a whole row); "rows" ignores it
    if not (need_dh or need_dw):
        return None, None, None
    check_capability("cuda", hidden.device, hidden.dtype, "hidden")
    rows = compact_rows(labels, opts.ignore_index)
    V, D = weight.shape
    n = labels.numel() if rows is None else rows.numel()
    launches = plan(n, D, V, weight.dtype, pass_="bwd", has_bias=bias is not None, need_dh=need_dh,
                    need_dw=need_dw, total_rows=labels.numel())
    rk = [x for x in launches if x.name == "entropy_logprob_bwd_kernel"]
    if rk and rk[0].meta.get("order") == "vocab":  # no fp32 [V, D] (module docstring)
        threads = {x.meta["vocab_cols"]: x.meta["threads"] for x in rk}
        return linear_vocab_backward(require_cuda(), hidden, weight, bias, labels, saved, grads, opts,
                                     rk[0].meta["vocab_cols"], need_dh=need_dh, need_dw=need_dw,
                                     threads=threads.__getitem__, rows=rows)
    step, threads = (rk[0].meta["chunk_rows"], rk[0].meta["threads"]) if rk else (1, 0)
    # dlogits in place in the logits chunk; the first chunk writes grad_weight's fp32 sums, accumulate_dw adds
    return linear_rows_backward(require_cuda(), hidden, weight, bias, labels, saved, grads, opts, step,
                                need_dh=need_dh, need_dw=need_dw, fp32_dlogits=False, accumulate_dw=_accumulate_dw,
                                threads=threads, rows=rows)


def _accumulate_dw(dW: Tensor, dz: Tensor, h: Tensor) -> None:
    gemm.accumulate_dw(dW, dz, h, DW_SLICE)
