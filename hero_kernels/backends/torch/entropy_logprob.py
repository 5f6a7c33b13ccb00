"""impl="torch": the fp32 row math of ``rowmath`` run over row chunks (the readable baseline).

Peak extra memory is O(chunk x V) (a few fp32 [chunk, V] temporaries), never O(N x V). Used on machines
without a compiled backend and as the readable baseline. fp32 math (fp64 for fp64 inputs).

Non-finite contract (the same on every backend, applied inside ``rowmath`` so the fused head shares it): a
row whose max is not finite (NaN anywhere, a +inf, or every column -inf) and a row whose label is outside
[0, V) (and not ignore_index) give NaN logp, H, lse and a NaN gradient row; -inf columns are masked vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...options import RowOptions
from .. import RowStats, UpstreamGrads
from .rowmath import row_dlogits, row_outputs, scaled_logits

#: elements of one [chunk, V] temporary (16M fp32 = 64 MiB)
CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> RowStats:
    """logits [N, V], labels [N] int64 -> (logp, H float32, lse float64) [N]; masked rows 0."""
    N, V = logits.shape
    outs = [torch.empty(N, dtype=dt, device=logits.device) for dt in (torch.float32, torch.float32, torch.float64)]
    cdt = _compute_dtype(logits.dtype)
    step = _chunk_rows(V)
    for s in range(0, N, step):
        e = min(N, s + step)
        res = row_outputs(scaled_logits(logits[s:e], opts.temperature, cdt), labels[s:e], opts.ignore_index)
        for o, r in zip(outs, res):
            o[s:e] = r
    return RowStats(outs[0], outs[1], outs[2])


def backward(logits: Tensor, labels: Tensor, saved: RowStats, grads: UpstreamGrads, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    """dlogits [N, V] in logits.dtype (into ``out`` if given; ``out`` may alias ``logits``); grads [N].

    Each chunk holds whole rows, so lse and H are recomputed from them; ``saved`` is not read.
    """
    N, V = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    cdt = _compute_dtype(logits.dtype)
    step = _chunk_rows(V)
    for s in range(0, N, step):
        e = min(N, s + step)
        x = scaled_logits(logits[s:e], opts.temperature, cdt)
        dz = row_dlogits(x, labels[s:e], grads.g[s:e], grads.k[s:e], opts.temperature, opts.ignore_index)
        # reads of logits[s:e] are done before this write, so out may alias logits
        out[s:e].copy_(dz)
    return out
