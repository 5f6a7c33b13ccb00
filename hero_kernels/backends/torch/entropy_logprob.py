"""impl="torch": the fp32 row math of ``rowmath`` run over row chunks (the readable baseline).

Peak extra memory is O(chunk x V) (a few fp32 [chunk, V] temporaries), never O(N x V). Used on machines
without a compiled backend and as the readable baseline. fp32 math (fp64 for fp64 inputs).

Non-finite contract (the same on every backend): a row whose max is not finite (NaN anywhere, a +inf, or
every column -inf) and a row whose label is outside [0, V) (and not ignore_index) give NaN logp, H, lse
and a NaN gradient row; -inf columns are masked vocabulary.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ...options import RowOptions
from .. import RowStats
from .rowmath import out_of_range_labels, row_dlogits, row_outputs, scaled_logits

#: elements of one [chunk, V] temporary (16M fp32 = 64 MiB)
CHUNK_ELEMENTS = 1 << 24


def _chunk_rows(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _undefined_rows(x: Tensor, labels: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """(nan_rows [n] bool, labels with those rows' labels replaced by 0) for rows x [n, V]: valid rows with
    no distribution (max not finite: NaN, +inf, all -inf) or a label outside [0, V)."""
    bad_label, safe = out_of_range_labels(labels, x.shape[-1], ignore_index)
    nan_rows = bad_label | ((labels != ignore_index) & ~torch.isfinite(x.amax(dim=-1)))  # amax propagates NaN
    return nan_rows, safe


def forward(logits: Tensor, labels: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor, Tensor]:
    """logits [N, V], labels [N] int64 -> (logp, H, lse) float32 [N]; masked rows 0."""
    N, V = logits.shape
    outs = [torch.empty(N, dtype=torch.float32, device=logits.device) for _ in range(3)]
    cdt = _compute_dtype(logits.dtype)
    step = _chunk_rows(V)
    for s in range(0, N, step):
        e = min(N, s + step)
        nan_rows, y = _undefined_rows(logits[s:e], labels[s:e], opts.ignore_index)
        res = row_outputs(scaled_logits(logits[s:e], opts.temperature, cdt), y, opts.ignore_index)
        for o, r in zip(outs, res):
            o[s:e] = r.masked_fill(nan_rows, float("nan"))
    return RowStats(outs[0], outs[1], outs[2])


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
    """dlogits [N, V] in logits.dtype (into ``out`` if given; ``out`` may alias ``logits``).

    Each chunk holds whole rows, so lse and H are recomputed from them; the saved ``lse``/``H`` are not needed.
    """
    N, V = logits.shape
    if out is None:
        out = torch.empty_like(logits)
    cdt = _compute_dtype(logits.dtype)
    step = _chunk_rows(V)
    for s in range(0, N, step):
        e = min(N, s + step)
        nan_rows, y = _undefined_rows(logits[s:e], labels[s:e], opts.ignore_index)
        x = scaled_logits(logits[s:e], opts.temperature, cdt)
        dz = row_dlogits(x, y, grad_logp[s:e], grad_H[s:e], opts.temperature, opts.ignore_index)
        # reads of logits[s:e] are done before this write, so out may alias logits
        out[s:e].copy_(dz.masked_fill(nan_rows.unsqueeze(-1), float("nan")))
    return out
