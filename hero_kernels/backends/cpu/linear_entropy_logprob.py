"""CPU fused LM head + entropy + log-prob: token chunks through torch.matmul, then the fused C++ rows.

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, opts) -> (logp, H, lse) fp32 [N]
backward(hidden, weight, bias, labels, lse, H, grad_logp, grad_H, opts)
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

import torch
from torch import Tensor

from hero_kernels._cpp_build import require_cpu
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "CHUNK_ELEMENTS"]

#: Target size of the [chunk, V] logits buffer, in elements (16 MiB of fp32): big enough for efficient
#: GEMMs, small enough to stay near the caches.
CHUNK_ELEMENTS = 1 << 22


def _chunk_rows(n: int, V: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(V, 1)))


def logits_chunk(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """h [c, D] @ weight.T (+ bias) -> [c, V] in h.dtype (torch's CPU GEMMs accumulate in fp32)."""
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def valid_rows(labels: Tensor, ignore_index: int) -> Tensor:
    return torch.nonzero(labels != ignore_index).flatten()


def rows_forward(ops, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions,
                 step: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The chunk loop shared with the CUDA backend: valid rows in chunks of ``step``, each chunk's logits
    through ``logits_chunk`` and the fused row kernel ``ops.entropy_logprob_fwd``."""
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logp, H, lse = torch.zeros(N, **f32), torch.zeros(N, **f32), torch.zeros(N, **f32)
    rows = valid_rows(labels, opts.ignore_index)
    for s in range(0, rows.numel(), step):
        idx = rows[s : s + step]
        z = logits_chunk(hidden.index_select(0, idx), weight, bias)
        lp, h, ls = ops.entropy_logprob_fwd(z, labels.index_select(0, idx), opts.inv_temperature, opts.ignore_index)
        logp.index_copy_(0, idx, lp)
        H.index_copy_(0, idx, h)
        lse.index_copy_(0, idx, ls)
    return logp, H, lse


def forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions
) -> Tuple[Tensor, Tensor, Tensor]:
    n_valid = int((labels != opts.ignore_index).sum())
    return rows_forward(require_cpu(), hidden, weight, bias, labels, opts, _chunk_rows(n_valid, weight.shape[0]))


def rows_backward(ops, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, lse: Tensor,
                  H: Tensor, grad_logp: Tensor, grad_H: Tensor, opts: RowOptions, step: int, *, need_dh: bool,
                  need_dw: bool, fp32_dlogits: bool, accumulate_dw) -> Tuple[Optional[Tensor], ...]:
    """The chunk loop shared with the CUDA backend: per chunk of valid rows, recompute the logits, turn them
    into dlogits with ``ops.entropy_logprob_bwd``, then dh = dz @ W and ``accumulate_dw(dW, dz, h)``.

    fp32_dlogits: 16-bit logits get their dlogits in a separate fp32 buffer (so the grad_weight GEMM sees
    unrounded values); otherwise dlogits overwrite the logits chunk in place.
    grad_weight / grad_bias accumulate in fp32 (fp64 for fp64 weights) and are cast at the end.
    """
    V, D = weight.shape
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_hidden = torch.zeros_like(hidden) if need_dh else None
    dW = torch.zeros((V, D), dtype=acc, device=weight.device) if need_dw else None
    db = torch.zeros(V, dtype=acc, device=weight.device) if (bias is not None and need_dw) else None
    rows = valid_rows(labels, opts.ignore_index)
    for s in range(0, rows.numel(), step):
        idx = rows[s : s + step]
        h = hidden.index_select(0, idx)
        z = logits_chunk(h, weight, bias)
        wide = fp32_dlogits and z.dtype not in (torch.float32, torch.float64)
        dz = torch.empty(z.shape, dtype=torch.float32, device=z.device) if wide else z
        ops.entropy_logprob_bwd(
            z,
            labels.index_select(0, idx),
            lse.index_select(0, idx),
            H.index_select(0, idx),
            grad_logp.index_select(0, idx),
            grad_H.index_select(0, idx),
            opts.inv_temperature,
            opts.ignore_index,
            dz,
        )
        if grad_hidden is not None:
            dz_w = dz if dz.dtype == weight.dtype else dz.to(weight.dtype)
            grad_hidden.index_copy_(0, idx, (dz_w @ weight).to(hidden.dtype))
        if dW is not None:
            accumulate_dw(dW, dz, h)
        if db is not None:
            db += dz.sum(0, dtype=acc)
    return (grad_hidden, None if dW is None else dW.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def _addmm_dw(dW: Tensor, dz: Tensor, h: Tensor) -> None:
    dW.addmm_(dz.t().to(dW.dtype), h.to(dW.dtype))


def backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Tensor,
    grad_H: Tensor,
    opts: RowOptions,
    *,
    logp: Optional[Tensor] = None,  # unused: the row kernels see whole rows and get 1 - p_y right themselves
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    if not (need_dh or need_dw):
        return None, None, None
    step = _chunk_rows(int((labels != opts.ignore_index).sum()), weight.shape[0])
    return rows_backward(require_cpu(), hidden, weight, bias, labels, lse, H, grad_logp, grad_H, opts, step,
                         need_dh=need_dh, need_dw=need_dw, fp32_dlogits=True, accumulate_dw=_addmm_dw)
