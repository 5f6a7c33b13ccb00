"""HERO entropy weights: ``w_i = L_s * softmax_{j in s}(-H_j / kappa)_i`` within each response ``s``.

``w = entropy_weights(H, mask_or_seq_ids, kappa=1.0, weight_on="all", advantages=None)``

Vectorized with segment (scatter) ops: no Python loop over responses, no ``.item()``, no data-dependent
shapes, so it traces under ``torch.compile(fullgraph=True)``. The tests compare these functions against a
float64 loop over responses (the test oracle, never used here).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .options import HEROLossConfig

__all__ = ["entropy_weights", "Segments", "segments_from_mask", "segments_from_ids", "segment_weights"]


class Segments(NamedTuple):
    """Flattened response structure of N tokens.

    seg:   [N] int64 segment index in [0, S); every masked token points at the spare segment S - 1.
    valid: [N] bool, token belongs to a response.
    count: [S] float32 number of valid tokens per segment (0 for empty / unused / the spare segment).
    S:     number of segments (a shape-derived Python int, never data-dependent).
    """

    seg: Tensor
    valid: Tensor
    count: Tensor
    S: int


def _finish(seg: Tensor, valid: Tensor, S: int) -> Segments:
    seg = torch.where(valid, seg, torch.full_like(seg, S - 1))
    count = torch.zeros(S, dtype=torch.float32, device=seg.device).index_add_(0, seg, valid.to(torch.float32))
    return Segments(seg, valid, count, S)


def segments_from_mask(mask: Tensor) -> Segments:
    """mask [B, T] (bool or 0/1, nonzero = valid): one response per row -> segments 0..B-1 (+ spare B)."""
    B, T = mask.shape
    valid = (mask != 0).reshape(-1)
    rows = torch.arange(B, device=mask.device, dtype=torch.int64).repeat_interleave(T)
    return _finish(rows, valid, B + 1)


def segments_from_ids(seq_ids: Tensor, extra_valid: Optional[Tensor] = None) -> Segments:
    """seq_ids [N] integers (any values; negative = masked) -> compact segments in [0, N) (+ spare N).

    Ids need not be contiguous, sorted or small: a stable sort groups equal ids and a cumulative sum of
    "id changed" flags numbers the groups, all with static shapes (torch.unique would not trace).
    extra_valid [N] bool (e.g. labels != ignore_index) further masks tokens.
    """
    ids = seq_ids.reshape(-1).to(torch.int64)
    N = ids.shape[0]
    valid = ids >= 0
    if extra_valid is not None:
        valid = valid & extra_valid.reshape(-1)
    # Masked tokens get one sentinel id so they sort last and never split or merge real groups.
    key = torch.where(valid, ids, torch.full_like(ids, torch.iinfo(torch.int64).max))
    sorted_ids, perm = torch.sort(key, stable=True)
    first = torch.ones(min(N, 1), dtype=torch.bool, device=ids.device)
    new_group = torch.cat([first, sorted_ids[1:] != sorted_ids[:-1]])
    compact_sorted = torch.cumsum(new_group.to(torch.int64), 0) - 1
    compact = torch.empty_like(compact_sorted).scatter_(0, perm, compact_sorted)
    return _finish(compact, valid, N + 1)


def segment_weights(H: Tensor, segs: Segments, kappa) -> Tensor:
    """w [N] = L_s * softmax_{j in s}(-H_j / kappa) per segment; masked tokens 0. H [N] float.

    Computed in float32 (float64 for float64 H). Differentiable w.r.t. H (the max shift is detached:
    softmax is shift invariant, so the gradient is exact).
    """
    dt = torch.float64 if H.dtype == torch.float64 else torch.float32
    seg, valid, count, S = segs
    kappa_t = torch.as_tensor(kappa, dtype=dt, device=H.device)  # explicit dtype: no fp64 scalars under Inductor
    # Masked rows may hold anything (NaN padding included); zero them so they cannot poison the spare segment.
    x = torch.where(valid, -H.to(dt) / kappa_t, torch.zeros((), dtype=dt, device=H.device))
    m = torch.full((S,), float("-inf"), dtype=dt, device=H.device)
    m = m.scatter_reduce(0, seg, x.detach(), reduce="amax", include_self=True)
    e = torch.exp(x - m[seg])  # the segment max gives e = 1, so every used segment has den >= 1
    den = torch.zeros(S, dtype=dt, device=H.device).index_add(0, seg, e)
    w = count.to(dt)[seg] * e / den[seg]
    return torch.where(valid, w, torch.zeros((), dtype=dt, device=H.device))


def gate_negative(w: Tensor, A: Tensor, valid: Tensor) -> Tensor:
    """weight_on="negative": keep w where A < 0, else 1; masked tokens stay 0. All [N]."""
    one = torch.ones((), dtype=w.dtype, device=w.device)
    return torch.where(valid & ~(A < 0), one, w)


def entropy_weights(
    H: Tensor,
    mask_or_seq_ids: Tensor,
    kappa: float = 1.0,
    weight_on: str = "all",
    advantages: Optional[Tensor] = None,
) -> Tensor:
    """HERO token weights, mean 1 over the valid tokens of each response.

    ``w_i = L_s * exp(-H_i / kappa) / sum_{j in s} exp(-H_j / kappa)`` where ``L_s`` is the number of
    valid tokens of response ``s``. Low-entropy (confident) tokens get weight > 1.

    Args:
        H: entropies, either [B, T] (one response per row) or [N] (packed tokens).
        mask_or_seq_ids: with H [B, T], a mask [B, T] (bool or 0/1; nonzero = valid token).
            With H [N], integer seq_ids [N] naming each token's response (any ids, need not be
            contiguous); a negative id masks the token.
        kappa: weight temperature, finite and non-zero; large |kappa| -> uniform weights (w -> 1).
            kappa > 0 up-weights confident (low-entropy) tokens, as HERO does; kappa < 0 up-weights
            uncertain (high-entropy) tokens, the direction of the 80/20 paper and GTPO, for ablations.
        weight_on: "all" or "negative" (w applies only where advantage < 0; elsewhere w = 1).
        advantages: needed for weight_on="negative": [B] or [B, T] with H [B, T]; [N] with H [N].

    Returns:
        w shaped like H, float32 (float64 for float64 H); masked tokens 0. An all-masked response
        contributes nothing (no NaN); a one-token response gets w = 1. Differentiable w.r.t. H when H
        requires grad (HERO detaches H by default: pass ``H.detach()``).
    """
    if not isinstance(H, Tensor) or not H.is_floating_point():
        raise TypeError(f"H must be a floating-point torch.Tensor, got {getattr(H, 'dtype', type(H).__name__)}")
    if not isinstance(mask_or_seq_ids, Tensor):
        raise TypeError(f"mask_or_seq_ids must be a torch.Tensor, got {type(mask_or_seq_ids).__name__}")
    HEROLossConfig.check("kappa", kappa)
    HEROLossConfig.check("weight_on", weight_on)
    if mask_or_seq_ids.device != H.device:
        raise ValueError(f"mask_or_seq_ids is on {mask_or_seq_ids.device} but H is on {H.device}")
    if H.dim() == 2:
        if tuple(mask_or_seq_ids.shape) != tuple(H.shape):
            raise ValueError(
                f"with H [B, T] = {tuple(H.shape)}, mask_or_seq_ids must be a mask of the same shape, "
                f"got {tuple(mask_or_seq_ids.shape)}"
            )
        segs = segments_from_mask(mask_or_seq_ids)
    elif H.dim() == 1:
        if mask_or_seq_ids.dtype == torch.bool or mask_or_seq_ids.is_floating_point():
            raise TypeError(
                "with H [N] (packed), mask_or_seq_ids must be integer seq_ids [N] (negative = masked); "
                f"got dtype {mask_or_seq_ids.dtype}. For one response per row pass H [B, T] with a mask [B, T]"
            )
        if tuple(mask_or_seq_ids.shape) != tuple(H.shape):
            raise ValueError(f"seq_ids must have shape {tuple(H.shape)} like H, got {tuple(mask_or_seq_ids.shape)}")
        segs = segments_from_ids(mask_or_seq_ids)
    else:
        raise ValueError(f"H must be [B, T] or [N], got shape {tuple(H.shape)}")
    w = segment_weights(H.reshape(-1), segs, kappa)
    if weight_on == "negative":
        if advantages is None:
            raise ValueError("weight_on='negative' needs advantages")
        if isinstance(advantages, Tensor) and advantages.device != H.device:
            raise ValueError(f"advantages is on {advantages.device} but H is on {H.device}")
        A = broadcast_advantages(advantages, H.shape, per_row=H.dim() == 2)
        w = gate_negative(w, A, segs.valid)
    return w.view(H.shape)


def broadcast_advantages(advantages, shape, per_row: bool) -> Tensor:
    """advantages [B] (per_row only, broadcast over T) or ``shape`` -> flat [N] float32."""
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    shape = tuple(shape)
    a = advantages
    if per_row and len(shape) == 2 and tuple(a.shape) in ((shape[0],), (shape[0], 1)):
        a = a.reshape(shape[0], 1).expand(shape)
    elif tuple(a.shape) != shape:
        want = f"[B] = ({shape[0]},) or {shape}" if per_row and len(shape) == 2 else f"{shape} (one per token)"
        raise ValueError(f"advantages must have shape {want}, got {tuple(a.shape)}")
    a = a.reshape(-1)
    return a.to(torch.float64) if a.dtype == torch.float64 else a.to(torch.float32)
