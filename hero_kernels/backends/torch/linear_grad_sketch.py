"""Gradient sketch through the LM head, chunked over rows (``impl="torch"``; the Triton / CPU backends run the
same loop with their own row kernels).

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, proj [k, V], opts)
    -> (a [N, k] fp32, stats [N, 2] fp32: the row op's saved statistics)
backward(hidden, weight, bias, labels, proj, a, stats, grad_a [N, k] fp32, opts, need_dh=True, need_dw=True)
    -> (grad_hidden [N, D] | None, grad_weight [V, D] | None, grad_bias [V] | None)

Masked rows are dropped before any GEMM. Per chunk of C valid rows: logits = h @ W^T (+ b) in the input
dtype (the model's own rounding), widened to the compute dtype (fp32; fp64 for fp64 inputs), then the row
op's forward / backward on that [C, V] tile. grad_weight / grad_bias accumulate in the compute dtype over
chunks and are cast at the end; grad_hidden = dz @ W per chunk. Peak extra memory: O(C * V + V * D), never
[N, V]. C keeps one [C, V] compute-dtype tile near ``chunk_elements`` (the row backend's CHUNK_ELEMENTS, 16 MiB
of fp32 here; the Triton backend passes 512 MiB so its GEMMs get ~1000 rows at V = 128k).
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional, Tuple

import torch
from torch import Tensor

from hero_kernels.options import RowOptions

from . import grad_sketch as rows_torch

__all__ = ["forward", "backward", "chunked_forward", "chunked_backward"]


def _chunks(labels: Tensor, ignore_index: int, V: int, chunk_elements: Optional[int]):
    idx = torch.nonzero(labels != ignore_index).flatten()
    step = max(1, (chunk_elements or rows_torch.CHUNK_ELEMENTS) // max(V, 1))
    for s in range(0, idx.numel(), step):
        yield idx[s:s + step]


def _logits(h: Tensor, weight: Tensor, bias: Optional[Tensor], cd: torch.dtype) -> Tensor:
    z = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    return z.to(cd)


def chunked_forward(rows: ModuleType, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    proj: Tensor, opts: RowOptions, chunk_elements: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The chunk loop, with ``rows`` (a backend's grad_sketch module) turning each logits tile into (a, stats)."""
    N, V, k = hidden.shape[0], weight.shape[0], proj.shape[0]
    cd = rows_torch.compute_dtype(hidden.dtype)
    a = torch.zeros((N, k), dtype=torch.float32, device=hidden.device)
    stats = torch.zeros((N, 2), dtype=torch.float32, device=hidden.device)
    P = proj.to(cd)
    for idx in _chunks(labels, opts.ignore_index, V, chunk_elements):
        z = _logits(hidden.index_select(0, idx), weight, bias, cd)
        ai, li = rows.forward(z, labels.index_select(0, idx), P, opts)
        a.index_copy_(0, idx, ai)
        stats.index_copy_(0, idx, li)
    return a, stats


def chunked_backward(rows: ModuleType, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                     proj: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, opts: RowOptions, need_dh: bool = True,
                     need_dw: bool = True, chunk_elements: Optional[int] = None
                     ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Recompute each chunk's logits, dz from ``rows.backward`` (compute dtype), then dh = dz @ W and
    dW += dz^T h, db += sum dz (accumulated in the compute dtype)."""
    N, D = hidden.shape
    V = weight.shape[0]
    cd = rows_torch.compute_dtype(hidden.dtype)
    need_db = need_dw and bias is not None
    dh = torch.zeros_like(hidden) if need_dh else None
    dW = torch.zeros((V, D), dtype=cd, device=weight.device) if need_dw else None
    db = torch.zeros(V, dtype=cd, device=weight.device) if need_db else None
    if need_dh or need_dw:
        P = proj.to(cd)
        for idx in _chunks(labels, opts.ignore_index, V, chunk_elements):
            h = hidden.index_select(0, idx)
            z = _logits(h, weight, bias, cd)
            dz = rows.backward(z, labels.index_select(0, idx), P, a.index_select(0, idx), stats.index_select(0, idx),
                               grad_a.index_select(0, idx), opts, out=z)  # dlogits overwrite the tile in place
            if dh is not None:
                dh.index_copy_(0, idx, (dz.to(weight.dtype) @ weight).to(hidden.dtype))
            if dW is not None:
                dW.addmm_(dz.t(), h.to(cd))
            if db is not None:
                db += dz.sum(0)
    return dh, None if dW is None else dW.to(weight.dtype), None if db is None else db.to(bias.dtype)


def forward(hidden, weight, bias, labels, proj, opts):
    return chunked_forward(rows_torch, hidden, weight, bias, labels, proj, opts)


def backward(hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh=True, need_dw=True):
    return chunked_backward(rows_torch, hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh, need_dw)
