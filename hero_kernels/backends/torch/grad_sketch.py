"""Gradient sketch, chunked PyTorch path (``impl="torch"``; ``impl="cpu"`` is the C++ kernel in backends/cpu).

forward(logits [N, V], labels [N] int64, proj [k, V], opts) -> (a [N, k] fp32, stats [N, 2] fp32 = (max x, log s))
backward(logits, labels, proj, a, stats, grad_a [N, k], opts, out=None) -> dlogits [N, V] in out's dtype
(logits.dtype when out is None; ``out`` may be ``logits`` itself)

With x = z / tau and p = softmax(x): a = (1/tau) (proj[:, y] - proj p), the projection of d log p_y / dz.
Backward for an upstream v: w = proj^T v ([V] per row), dz = -(p / tau^2) (w - p . w). Here p . w is summed
from the chunk's own p and w (it equals (proj p) . v), so no precision is lost reconstructing it.

Rows are processed in contiguous ranges of C rows (views: no gather copy); masked rows in a range are computed
and then zeroed (torch.where / masked_fill, so a NaN of an all -inf masked row cannot leak). Peak extra memory is a few
[C, V] temporaries in the compute dtype (fp32; fp64 for fp64 logits), never [N, V]. The softmax is
materialized per chunk here (torch.softmax, the fused kernel); the Triton backend is the one-pass kernel that
never forms p.
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


def _ranges(N: int, V: int):
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for s in range(0, N, step):
        yield s, min(N, s + step)


def _softmax(z: Tensor, inv_t: float, cd: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(p, stats) of rows z [C, V] at temperature 1 / inv_t, in ``cd``: stats [C, 2] = (m, log s) with
    x = z * inv_t, m = max x, s = sum e^{x - m}. log s = -log p_max (p_max = 1 / s exactly), so no second
    exp pass and no lse rounding (at large logits ulp(lse) would put its relative error on every p)."""
    x = z.to(cd)
    x = x * inv_t if inv_t != 1.0 else x
    p = torch.softmax(x, dim=-1)
    m, j = x.max(dim=-1, keepdim=True)
    return p, torch.cat([m, -torch.log(p.gather(-1, j))], dim=-1)


def forward(logits: Tensor, labels: Tensor, proj: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor]:
    N, V = logits.shape
    k = proj.shape[0]
    a = torch.empty((N, k), dtype=torch.float32, device=logits.device)
    stats = torch.empty((N, 2), dtype=torch.float32, device=logits.device)
    cd = compute_dtype(logits.dtype)
    P = proj.to(cd)
    valid = (labels != opts.ignore_index).unsqueeze(-1)
    bad = _bad_labels(labels, V, opts)
    safe = torch.where(valid.squeeze(-1) & ~bad.squeeze(-1), labels, 0)
    inv_t = opts.inv_temperature
    for s, e in _ranges(N, V):
        p, st = _softmax(logits[s:e], inv_t, cd)
        sk = (P.index_select(1, safe[s:e]).t() - p @ P.t()) * inv_t
        del p
        a[s:e] = torch.where(valid[s:e], sk, 0.0).masked_fill_(bad[s:e], float("nan"))
        stats[s:e] = torch.where(valid[s:e], st, 0.0).masked_fill_(bad[s:e], float("nan"))
    return a, stats


def _bad_labels(labels: Tensor, V: int, opts: RowOptions) -> Tensor:
    """[N, 1] bool: a label that is neither ignore_index nor in [0, V). With label checks off (or in a kernel
    that cannot raise) such a row gets NaN results and gradients, as on every backend, never an indexing error."""
    return ((labels != opts.ignore_index) & ((labels < 0) | (labels >= V))).unsqueeze(-1)


def backward(logits: Tensor, labels: Tensor, proj: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    """The saved (a, stats) are not needed: each chunk holds whole rows and recomputes p in the compute dtype.
    Each range's logits are read before its rows of ``out`` are written, so ``out`` may alias ``logits``."""
    N, V = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    cd = compute_dtype(logits.dtype)
    P = proj.to(cd)
    valid = (labels != opts.ignore_index).unsqueeze(-1)
    bad = _bad_labels(labels, V, opts)
    inv_t = opts.inv_temperature
    for s, e in _ranges(N, V):
        p, _ = _softmax(logits[s:e], inv_t, cd)
        w = grad_a[s:e].to(cd) @ P  # [C, V]
        c = torch.bmm(p.unsqueeze(1), w.unsqueeze(2)).squeeze(2)  # (proj p) . v, [C, 1]; no [C, V] temporary
        dz = w.sub_(c).mul_(p).mul_(-inv_t * inv_t)
        del p
        out[s:e] = dz.masked_fill_(~valid[s:e], 0.0).masked_fill_(bad[s:e], float("nan"))  # in place
    return out
