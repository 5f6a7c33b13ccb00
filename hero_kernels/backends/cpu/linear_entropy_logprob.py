"""CPU fused LM head + entropy + log-prob: token chunks through torch.matmul, then the fused C++ rows.

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, opts) -> (logp, H, lse) fp32 [N]
backward(hidden, weight, bias, labels, saved: RowStats, grads: UpstreamGrads, opts)
    -> (grad_hidden [N, D] in hidden.dtype, grad_weight [V, D] in weight.dtype, grad_bias [V] | None)
    need_dh=False / need_dw=False (keywords): that gradient is None and its GEMM (dz @ W, or the fp32
    dz^T h accumulation with db) is skipped.

Memory: logits never exist for all N rows at once; a [chunk, V] buffer (about CHUNK_ELEMENTS elements) is
computed, consumed by the row kernel, and (backward) recomputed and turned into dlogits in place.
Masked rows (label == ignore_index) are dropped before any GEMM. grad_weight / grad_bias accumulate
across chunks in fp32 (fp64 for fp64 weights): summing bf16 partials skews training (axolotl #1601).
No autograd here.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from hero_kernels._cpp_build import require_cpu
from hero_kernels.backends import RowStats, UpstreamGrads, compact_rows
from hero_kernels.backends.cpp_launch import linear_rows_backward, linear_rows_forward
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "CHUNK_ELEMENTS"]

#: Target size of the [chunk, V] logits buffer, in elements (16 MiB of fp32): big enough for efficient
#: GEMMs, small enough to stay near the caches.
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(n: int, V: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(V, 1)))


def forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions
) -> RowStats:
    rows = compact_rows(labels, opts.ignore_index)
    n = labels.numel() if rows is None else rows.numel()
    return linear_rows_forward(require_cpu(), hidden, weight, bias, labels, opts, _chunk_rows(n, weight.shape[0]),
                               rows=rows)


def _addmm_dw(dW: Tensor, dz: Tensor, h: Tensor) -> None:
    dW.addmm_(dz.t().to(dW.dtype), h.to(dW.dtype))


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, saved: RowStats,
             grads: UpstreamGrads, opts: RowOptions, *, need_dh: bool = True,
             need_dw: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    # saved.logp is not read: the row kernels see whole rows and get 1 - p_y right themselves
    if not (need_dh or need_dw):
        return None, None, None
    rows = compact_rows(labels, opts.ignore_index)
    step = _chunk_rows(labels.numel() if rows is None else rows.numel(), weight.shape[0])
    return linear_rows_backward(require_cpu(), hidden, weight, bias, labels, saved, grads, opts, step,
                                need_dh=need_dh, need_dw=need_dw, fp32_dlogits=True, accumulate_dw=_addmm_dw,
                                rows=rows)
