"""CPU fused entropy + log-prob rows: launchers over torch.ops.hero_kernels_cpp (no autograd here).

forward(logits [N, V] or [B, T, V], labels [N] / [B, T] int64, opts) -> (logp, H, lse), each fp32 [N]
backward(logits, labels, saved: RowStats, grads: UpstreamGrads, opts, out=None) -> dlogits (shape of logits) in
    logits.dtype (saved.lse, saved.H and grads.g, grads.k: [N])

logits: last-dim stride 1, any row and batch stride (one call for a [B, T, V] view); bf16 / fp16 / fp32 /
fp64. Masked rows (label == opts.ignore_index) give 0 outputs and 0 gradient, a label outside [0, V) a NaN
row. ``out`` may be ``logits`` itself (in-place backward), or a float32 tensor of its shape (used by the
fused LM-head path to keep dlogits in fp32).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from hero_kernels._cpp_build import require_cpu
from hero_kernels.backends import RowStats, UpstreamGrads
from hero_kernels.backends.cpp_launch import rows_backward, rows_forward
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "BATCHED"]

#: forward / backward take a [B, T, V] view of any batch stride in one call (see hero_kernels.entropy_logprob).
BATCHED = True


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> RowStats:
    return rows_forward(require_cpu(), logits, labels, opts)


def backward(logits: Tensor, labels: Tensor, saved: RowStats, grads: UpstreamGrads, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    return rows_backward(require_cpu(), logits, labels, saved, grads, opts, out)
