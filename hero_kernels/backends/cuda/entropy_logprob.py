"""CUDA fused entropy + log-prob rows: launchers over torch.ops.hero_kernels_cpp (no autograd here).

Kernels in csrc/entropy_logprob_cuda.cu: one block per row, asynchronous on the current stream.

forward(logits [N, V], labels [N] int64, opts) -> (logp, H, lse), each fp32 [N]
backward(logits, labels, lse, H, grad_logp, grad_H, opts, out=None) -> dlogits [N, V] in logits.dtype

logits: last-dim stride 1, any row stride; bf16 / fp16 / fp32 (fp64 is refused). Masked rows (label ==
opts.ignore_index) give 0 outputs and 0 gradient. ``out`` may be ``logits`` itself (in-place backward),
or a float32 [N, V] tensor (used by the fused LM-head path to keep dlogits in fp32).
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor

from hero_kernels._cpp_build import require_cuda
from hero_kernels.backends.cpu.entropy_logprob import rows_backward, rows_forward
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward"]


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor]:
    return rows_forward(require_cuda(), logits, labels, opts)


def backward(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Tensor,
    grad_H: Tensor,
    opts: RowOptions,
    out: Optional[Tensor] = None,
) -> Tensor:
    return rows_backward(require_cuda(), logits, labels, lse, H, grad_logp, grad_H, opts, out)
