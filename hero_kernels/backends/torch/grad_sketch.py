"""Gradient sketch, chunked PyTorch path (``impl="torch"``; also what ``impl="cpu"`` runs).

forward(logits [N, V], labels [N] int64, proj [k, V], opts) -> (a [N, k] fp32, stats [N, 2] fp32 = (max x, log s))
backward(logits, labels, proj, a, stats, grad_a [N, k], opts, out=None) -> dlogits [N, V] in out's dtype
(logits.dtype when out is None; ``out`` may be ``logits`` itself)

With x = z / tau and p = softmax(x): a = (1/tau) (proj[:, y] - proj p), the projection of d log p_y / dz.
Backward for an upstream v: w = proj^T v ([V] per row), dz = -(p / tau^2) (w - p . w). Here p . w is summed
from the chunk's own p and w (it equals (proj p) . v), so no precision is lost reconstructing it.

Rows are processed in chunks of C valid rows (masked rows are dropped first): peak extra memory is a few
[C, V] temporaries in the compute dtype (fp32; fp64 for fp64 logits), never [N, V]. The softmax is
materialized per chunk here; the Triton backend is the one-pass kernel that never forms p.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "CHUNK_ELEMENTS", "compute_dtype"]

#: elements of one [C, V] temporary (4M fp32 = 16 MiB)
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(idx: Tensor, V: int):
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for s in range(0, idx.numel(), step):
        yield idx[s:s + step]


def _softmax(z: Tensor, inv_t: float, cd: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(p, stats) of rows z [C, V] at temperature 1 / inv_t, in ``cd``: stats [C, 2] = (m, log s), x = z * inv_t,
    m = max x, s = sum e^{x - m}. p = e^{x - m} / s (not e^{x - lse}: lse's rounding at large logits would put a
    relative error of ulp(lse) on every p)."""
    x = z.to(cd) * inv_t
    m = x.max(dim=-1, keepdim=True).values
    e = torch.exp(x - m)
    s = e.sum(-1, keepdim=True)
    return e / s, torch.cat([m, torch.log(s)], dim=-1)


def forward(logits: Tensor, labels: Tensor, proj: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor]:
    N, V = logits.shape
    k = proj.shape[0]
    a = torch.zeros((N, k), dtype=torch.float32, device=logits.device)
    stats = torch.zeros((N, 2), dtype=torch.float32, device=logits.device)
    cd = compute_dtype(logits.dtype)
    P = proj.to(cd)
    inv_t = opts.inv_temperature
    for rows in _chunks(torch.nonzero(labels != opts.ignore_index).flatten(), V):
        p, st = _softmax(logits.index_select(0, rows), inv_t, cd)
        sk = (P.index_select(1, labels.index_select(0, rows)).t() - p @ P.t()) * inv_t
        a.index_copy_(0, rows, sk.to(torch.float32))
        stats.index_copy_(0, rows, st.to(torch.float32))
    return a, stats


def backward(logits: Tensor, labels: Tensor, proj: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    """The saved (a, stats) are not needed: each chunk holds whole rows and recomputes p in the compute dtype."""
    N, V = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    valid = labels != opts.ignore_index
    out.index_fill_(0, torch.nonzero(~valid).flatten(), 0)  # masked rows only: ``out`` may alias ``logits``
    cd = compute_dtype(logits.dtype)
    P = proj.to(cd)
    inv_t = opts.inv_temperature
    for rows in _chunks(torch.nonzero(valid).flatten(), V):
        p, _ = _softmax(logits.index_select(0, rows), inv_t, cd)
        w = grad_a.index_select(0, rows).to(cd) @ P  # [C, V]
        c = (p * w).sum(-1, keepdim=True)
        out.index_copy_(0, rows, (p * (w - c) * (-inv_t * inv_t)).to(out.dtype))
    return out
