"""Row math of the chunked torch backend: entropy, log-prob and dlogits of whole rows, in fp32 (fp64 for fp64).

Production code of its own: nothing here imports ``hero_kernels.reference`` (the float64 oracle the tests
compare against), so a slip in either one shows up as a disagreement.

For rows x [C, V] (already divided by the temperature), with m = max_j x_j at column a (the argmax):
    e_j  = exp(x_j - m), with the argmax term (= 1) kept apart: s_r = sum_{j != a} e_j, s = 1 + s_r
    log s = log1p(s_r)                        (log of a sum near 1 keeps its digits)
    lse  = m + log s
    log p_j = (x_j - m) - log s               (never x_j - lse: lse rounds away log s when |m| is large)
    H    = log s - sum_j (x_j - m) e_j / s    (both terms >= 0: no cancellation as H -> 0)
    log p_y = -log s when y = a, else (x_y - m) - log s; when y = a, 1 - p_y = s_r / s.
The label is the argmax whenever p_y > 1/2, so these forms keep the relative accuracy of log p_y, H and
the label column's gradient g (1 - p_y) as p_y -> 1 (the confident tokens HERO up-weights).

Non-finite inputs follow the backend contract (docs/design.md 1.5), here for every caller (the row op and the
fused head alike): ``-inf`` columns are masked vocabulary (e = 0, and the ``(x - m) e`` term is skipped there so
no ``-inf * 0`` appears); a valid row whose max is not finite (NaN anywhere, a +inf, or every column -inf) or
whose label is outside [0, V) gets NaN logp, H, lse and a NaN gradient row (``_undefined_rows``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["RowReduction", "row_reduction", "row_outputs", "row_dlogits", "scaled_logits", "out_of_range_labels"]


class RowReduction(NamedTuple):
    """Per-row reductions of rows x [C, V] that the row math builds on; each [C] in the compute dtype (argmax
    int64). Not ``hero_kernels.backends.RowStats`` (a forward's logp / H / lse across the backend contract)."""

    m: Tensor
    argmax: Tensor
    s_r: Tensor
    log_s: Tensor
    H: Tensor


def scaled_logits(z: Tensor, temperature: float, dtype: torch.dtype) -> Tensor:
    """x = z / temperature in ``dtype`` (one rounding of z, the same in forward and backward)."""
    x = z.to(dtype)
    return x / temperature if temperature != 1.0 else x


def row_reduction(x: Tensor) -> RowReduction:
    """(m, argmax, s_r, log s, H) of rows x [C, V]."""
    m, argmax = x.max(dim=-1)
    d = x - m.unsqueeze(-1)  # x_j - m <= 0
    e = torch.exp(d)
    e.scatter_(-1, argmax.unsqueeze(-1), 0.0)  # keep the argmax's 1 apart
    s_r = e.sum(-1)
    log_s = torch.log1p(s_r)
    t = torch.where(e > 0, d * e, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)  # <= 0
    return RowReduction(m, argmax, s_r, log_s, log_s - t / (1.0 + s_r))


def out_of_range_labels(labels: Tensor, V: int, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """(bad [n] bool, labels with the bad ones replaced by 0): labels outside [0, V) that are not ignore_index.
    The backend contract makes such a row NaN (logp, H, lse and its gradient) instead of reading out of
    bounds; elementwise on [n], no host sync (the host-side range check is ``hero_kernels.checks(labels=)``)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    return bad, torch.where(bad, torch.zeros_like(labels), labels)


def _label_ids(labels: Tensor, ignore_index: int, V: int):
    """(valid, bad_label, safe label ids) [C]: bad labels (outside [0, V)) read column 0 instead."""
    valid = labels != ignore_index
    bad, lab = out_of_range_labels(labels, V, ignore_index)
    return valid, bad, torch.where(valid, lab, torch.zeros_like(lab)).long()


def _undefined_rows(st: RowReduction, valid: Tensor, bad_label: Tensor) -> Tensor:
    """[C] bool: valid rows without a distribution (max not finite: NaN, +inf, all -inf; ``max`` propagates
    NaN) or with a bad label. Reuses the row max, so the rule costs no extra pass over the row."""
    return bad_label | (valid & ~torch.isfinite(st.m))


def row_outputs(x: Tensor, labels: Tensor, ignore_index: int):
    """(logp, H) [C] in x.dtype and lse [C] in float64 (m + log s unrounded, as the backends save it);
    rows with label == ignore_index are 0."""
    st = row_reduction(x)
    valid, bad, safe = _label_ids(labels, ignore_index, x.shape[-1])
    nan_rows = _undefined_rows(st, valid, bad)
    d_y = x.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - st.m
    logp = torch.where(safe == st.argmax, -st.log_s, d_y - st.log_s)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return tuple(torch.where(valid, v, zero).masked_fill_(nan_rows, float("nan"))
                 for v in (logp, st.H, st.m.double() + st.log_s.double()))


def row_dlogits(
    x: Tensor,
    labels: Tensor,
    grad_logp: Optional[Tensor],
    grad_H: Optional[Tensor],
    temperature: float,
    ignore_index: int,
) -> Tensor:
    """dL/dz [C, V] in x.dtype for rows x = z / temperature [C, V]:
    (1/tau) [g (1[j=y] - p_j) - k p_j (log p_j + H)], g = grad_logp, k = grad_H ([C] or None = 0).
    Statistics are recomputed from the rows (whole rows are at hand); ignored rows get 0."""
    st = row_reduction(x)
    valid, bad, safe = _label_ids(labels, ignore_index, x.shape[-1])
    logq = (x - st.m.unsqueeze(-1)) - st.log_s.unsqueeze(-1)
    p = torch.exp(logq)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    at_y = safe.unsqueeze(-1)
    dz = torch.zeros_like(x)
    lab = torch.zeros_like(st.m)  # the label column's value, set apart from the tile's
    if grad_H is not None:
        k = grad_H.to(x.dtype)
        dz = torch.where(p > 0, p * (logq + st.H.unsqueeze(-1)), zero).mul_(k.unsqueeze(-1)).neg_()
        lab = dz.gather(-1, at_y).squeeze(-1)
    if grad_logp is not None:
        g = grad_logp.to(x.dtype)
        one_minus_py = torch.where(safe == st.argmax, st.s_r / (1.0 + st.s_r),
                                   1.0 - p.gather(-1, at_y).squeeze(-1))
        dz.addcmul_(p, g.unsqueeze(-1), value=-1.0)  # -g p_j off the label
        lab = lab + g * one_minus_py  # never -g p_y + g: that cancels to noise as p_y -> 1
    dz.scatter_(-1, at_y, lab.unsqueeze(-1))
    if temperature != 1.0:
        dz = dz / temperature
    dz = torch.where(valid.unsqueeze(-1), dz, zero)
    return dz.masked_fill_(_undefined_rows(st, valid, bad).unsqueeze(-1), float("nan"))
