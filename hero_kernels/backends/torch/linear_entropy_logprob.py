"""Fused LM head, chunked PyTorch path (``impl="torch"``): the fp32 row math of ``rowmath``, one row chunk at a time.

Shapes: hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64 -> (logp, H, lse) fp32 [N];
backward -> (grad_hidden [N, D] hidden.dtype, grad_weight [V, D] weight.dtype, grad_bias [V] | None);
``need_dh=False`` / ``need_dw=False`` skip the dh GEMM / the fp32 dW (and db) accumulation, returning None.

Each chunk of C valid rows builds its fp32 logits [C, V] (``_chunk_logits``) and calls
``rowmath.row_outputs`` / ``rowmath.row_dlogits`` on them; nothing re-derives the formulas here. Masked rows
(``ignore_index``) are dropped before any GEMM; a label outside [0, V) gives a NaN row (logp, H, lse, gradient).
Gradients accumulate in fp32 over chunks and are cast to the input dtypes at the end. float64 inputs (CPU only)
are computed in float64 throughout (outputs logp / H / lse still fp32, per the backend interface).

Memory: the row functions hold a few fp32 [C, V] temporaries, so the peak extra memory is
O(C * V) for the chunk plus the fp32 copies / accumulators O(N * D + V * D) (fp32 weight copy when the
weight is 16-bit, fp32 grad_weight and grad_hidden accumulators), never O(N * V). C is chosen so one fp32
[C, V] chunk stays under ``TorchChunkConfig.max_chunk_bytes``.

The backward takes the saved RowStats for interface parity but recomputes lse and H from the chunk's logits;
both are the same quantities of the same row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.backends import RowStats, UpstreamGrads
from hero_kernels.options import RowOptions

from .rowmath import row_dlogits, row_outputs, scaled_logits

__all__ = ["TorchChunkConfig", "forward", "backward", "chunk_rows"]


@dataclass(frozen=True)
class TorchChunkConfig:
    """max_chunk_bytes: budget of ONE fp32 [rows, V] chunk tensor; min_rows: lower bound on rows per chunk."""

    max_chunk_bytes: int = 16 << 20
    min_rows: int = 8

    def __post_init__(self):
        if self.max_chunk_bytes <= 0 or self.min_rows < 1:
            raise ValueError(f"TorchChunkConfig needs max_chunk_bytes > 0 and min_rows >= 1, got {self}")


_DEFAULT = TorchChunkConfig()


def chunk_rows(V: int, config: Optional[TorchChunkConfig] = None) -> int:
    """Rows per chunk so that an fp32 [rows, V] tensor fits the budget."""
    cfg = config or _DEFAULT
    return max(cfg.min_rows, cfg.max_chunk_bytes // (4 * max(V, 1)))


def _valid_rows(labels: Tensor, ignore_index: int) -> Tensor:
    return torch.nonzero(labels != ignore_index).squeeze(1)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """fp32 math for 16/32-bit inputs; float64 inputs (CPU) keep float64 so gradcheck-level accuracy holds."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _cast(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if x is None else x.to(dtype)


def _chunk_logits(h: Tensor, w: Tensor, b: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """h [C, D] @ w.T (+ b) -> [C, V] in ``dtype`` (w, b already in ``dtype``)."""
    h = h.to(dtype)
    return torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())


def forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    opts: RowOptions,
    config: Optional[TorchChunkConfig] = None,
) -> RowStats:
    """RowStats(logp, H fp32, lse fp64) [N]; masked rows 0."""
    N = hidden.shape[0]
    V = weight.shape[0]
    # Three separate tensors: the public custom op may not return outputs that alias each other.
    out = tuple(torch.zeros(N, dtype=dt, device=hidden.device) for dt in (torch.float32, torch.float32, torch.float64))
    idx = _valid_rows(labels, opts.ignore_index)
    if idx.numel() == 0:
        return RowStats(*out)
    cd = _compute_dtype(hidden)
    # One fp32 copy of the (possibly 16-bit) weight, reused by every chunk (no-op for fp32).
    w32, b32 = weight.to(cd), _cast(bias, cd)
    C = chunk_rows(V, config)
    for start in range(0, idx.numel(), C):
        rows = idx[start:start + C]
        z = scaled_logits(_chunk_logits(hidden.index_select(0, rows), w32, b32, cd), opts.temperature, cd)
        # row_outputs applies the non-finite rule (bad labels, +inf / NaN / all -inf rows: NaN rows)
        res = row_outputs(z, labels.index_select(0, rows), opts.ignore_index)
        del z
        for o, r in zip(out, res):
            o.index_copy_(0, rows, r.to(o.dtype))
    return RowStats(*out)


def backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, saved: RowStats,
             grads: UpstreamGrads, opts: RowOptions, config: Optional[TorchChunkConfig] = None, *,
             need_dh: bool = True, need_dw: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients accumulated in fp32 over row chunks, cast to the input dtypes at the end.

    need_dh=False: grad_hidden is None and the dz @ W GEMM is skipped. need_dw=False: grad_weight and
    grad_bias are None and neither the fp32 [V, D] accumulator nor the dz^T h GEMM exists.
    grads: fp32 [N] (g / k None = zeros). ``saved`` is not read: each chunk holds whole rows, so the row math
    recomputes lse / H and the label column's 1 - p_y accurately from them."""
    N, D = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    need_db = need_dw and bias is not None
    if not (need_dh or need_dw):
        return None, None, None
    idx = _valid_rows(labels, opts.ignore_index)
    if idx.numel() == 0:
        return (torch.zeros_like(hidden) if need_dh else None, torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if need_db else None)
    cd = _compute_dtype(hidden)
    w32, b32 = weight.to(cd), _cast(bias, cd)
    dh = torch.zeros((N, D), dtype=cd, device=dev) if need_dh else None
    dw = torch.zeros((V, D), dtype=cd, device=dev) if need_dw else None
    db = torch.zeros((V,), dtype=cd, device=dev) if need_db else None
    g_all, k_all = _cast(grads.g, cd), _cast(grads.k, cd)
    C = chunk_rows(V, config)
    for start in range(0, idx.numel(), C):
        rows = idx[start:start + C]
        h32 = hidden.index_select(0, rows).to(cd)
        z = scaled_logits(_chunk_logits(h32, w32, b32, cd), opts.temperature, cd)
        dz = row_dlogits(  # NaN rows by the same rule as row_outputs
            z,
            labels.index_select(0, rows),
            None if g_all is None else g_all.index_select(0, rows),
            None if k_all is None else k_all.index_select(0, rows),
            opts.temperature,
            opts.ignore_index,
        )
        del z
        if dh is not None:
            dh.index_copy_(0, rows, dz @ w32)
        if dw is not None:
            dw.addmm_(dz.t(), h32)  # in place: no [V, D] temporary per chunk
        if db is not None:
            db += dz.sum(0)
        del dz
    return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))
