"""Vocab-sharded (tensor-parallel) fused LM head: per-shard partials, one-step merge, per-shard backward.

Each rank holds a weight shard ``W_r`` [V_r, D] with the global vocabulary rows
``[vocab_start_r, vocab_start_r + V_r)`` (and the matching bias slice); every rank sees the same hidden
[N, D] and global labels [N].

Forward
    1. ``shard_partials``: per row, over the shard's columns of x = (h W_r^T + b_r) / tau, with m = max x:
       ``s = sum e^{x-m}``, ``so`` = the same sum over the columns that are NOT the label, ``t = sum (x - m)
       e^{x-m}`` (shifted: every term <= 0) and ``label_x`` = x[label] if the label lies in the shard, else 0.
       fp32 [N] each; masked rows give (-inf, 0, 0, 0, 0). On CUDA (or under TRITON_INTERPRET) the Triton
       kernel computes them with no [N, V_r] tensor (its vocab splits merged like shards); on CPU a chunked
       torch loop.
    2. ONE collective: ``all_reduce_partials`` all-gathers the [5, N] partials of every rank and each rank
       merges them in rank order (``merge_stacked_partials``), so every rank holds identical merged partials.
       (A max-then-sum all-reduce would need two steps.) Merging rebases each shard to the global max M:
       s += a s_k, so += a so_k, t += a (t_k + (m_k - M) s_k) with a = e^{m_k - M}: sums of like-signed terms.
    3. ``finalize`` -> (logp, H fp32, lse float64 = float64(M) + float64(log s), unrounded); masked rows 0. With e_y = e^{x_y - M} >= so (p_y >= 1/2; then the label
       is the row max) log p_y = -log1p(so / e_y) and log s = (x_y - M) + log1p(so / e_y): both keep their
       relative accuracy as p_y -> 1, where x_y - lse and log(s ~ 1) are rounding noise; otherwise the plain
       x_y - M - log s. H = log s - t / s adds two non-negative terms (no cancellation against |lse| at
       large logit offsets). Accuracy note: when a column OTHER than the label dominates, log s ~ 0 is taken
       as log(s), so H -> 0 there keeps an absolute (not relative) accuracy of ~eps.

Backward (``shard_backward``), given the GLOBAL RowStats (lse, H and, for the label column, logp) from ``finalize``:
    dz_ij = (1/tau) [g_i (1[j=y_i] - p_ij) - k_i p_ij (log p_ij + H_i)],  log p_ij = (x_ij - hi_i) - lo_i
    with the float64 lse split per row into fp32 hi + lo (as the unsharded backward does): x - hi is exact
    near the row max, so p carries no ulp(lse) error at large logit offsets (x - fp32 lse would);
    for the shard's columns only; the label column takes 1 - p_y = -expm1(logp) and log p_y = logp (accurate
    as p_y -> 1). grad_weight / grad_bias are the shard's own (no communication); grad_hidden is this shard's
    share sum_{j in shard} dz_ij W_j in fp32, to be summed over ranks (``all_reduce_grad_hidden``) and then cast
    to the hidden dtype.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hero_kernels.backends import RowStats, UpstreamGrads
from hero_kernels.options import RowOptions

__all__ = [
    "Partials",
    "shard_partials",
    "stack_partials",
    "merge_stacked_partials",
    "finalize",
    "all_reduce_partials",
    "shard_backward",
    "all_reduce_grad_hidden",
    "sharded_linear_entropy_logprob",
]


class Partials(NamedTuple):
    """Per-row online partials of one vocab shard (or merged), each fp32 [N] (or [K, N] stacked).

    m = max x, s = sum e^{x-m}, so = sum over the non-label columns, t = sum (x - m) e^{x-m} (<= 0),
    label_x = x[label] in the shard holding the label, else 0."""

    m: Tensor
    s: Tensor
    so: Tensor
    t: Tensor
    label_x: Tensor


def _resolve_impl(impl: str, hidden: Tensor) -> str:
    if impl == "auto":
        return "triton" if hidden.is_cuda else "torch"
    if impl not in ("triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch' for sharded ops, got {impl!r}")
    return impl


def _check_shard(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, vocab_start: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V_local, D] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight shard must have at least one vocabulary row")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias shard must be [V_local]={weight.shape[0]}, got {tuple(bias.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N]={hidden.shape[0]}, got {tuple(labels.shape)}")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0, got {vocab_start!r}")


def _chunk_rows(V_local: int, max_chunk_bytes: int) -> int:
    return max(8, max_chunk_bytes // (4 * V_local))


def _local_labels(labels: Tensor, vocab_start: int, V_local: int) -> Tuple[Tensor, Tensor]:
    """(label - vocab_start clamped to a safe index, whether the label is in this shard)."""
    loc = labels - vocab_start
    inside = (loc >= 0) & (loc < V_local)
    return torch.where(inside, loc, torch.zeros_like(loc)), inside


def shard_partials(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    vocab_start: int,
    bias: Optional[Tensor] = None,
    opts: RowOptions = RowOptions(),
    impl: str = "auto",
    max_chunk_bytes: int = 16 << 20,
) -> Partials:
    """Partials of the shard ``weight`` [V_local, D] (global rows from ``vocab_start``). Each fp32 [N]."""
    _check_shard(hidden, weight, bias, labels, vocab_start)
    N, V_local = hidden.shape[0], weight.shape[0]
    out = torch.zeros((5, N), dtype=torch.float32, device=hidden.device)
    out[0].fill_(float("-inf"))
    if _resolve_impl(impl, hidden) == "triton":
        return _triton_partials(hidden, weight, bias, labels, vocab_start, opts, out)
    idx = torch.nonzero(labels != opts.ignore_index).squeeze(1)
    w32 = weight.to(torch.float32)
    b32 = None if bias is None else bias.to(torch.float32)
    C = _chunk_rows(V_local, max_chunk_bytes)
    for start in range(0, idx.numel(), C):
        rows = idx[start:start + C]
        x = _shard_logits(hidden.index_select(0, rows), w32, b32) / opts.temperature
        loc, inside = _local_labels(labels.index_select(0, rows), vocab_start, V_local)
        out.index_copy_(1, rows, torch.stack(_row_partials(x, loc, inside)))
    return Partials(*out)


def _shard_logits(h: Tensor, w32: Tensor, b32: Optional[Tensor]) -> Tensor:
    """h [C, D] @ w32.T (+ b32) in fp32 -> [C, V_local]."""
    h = h.to(torch.float32)
    return torch.mm(h, w32.t()) if b32 is None else torch.addmm(b32, h, w32.t())


def _row_partials(x: Tensor, loc: Tensor, inside: Tensor) -> Tuple[Tensor, ...]:
    """(m, s, so, t, label_x) of rows x [C, V_local]; loc / inside: the shard-local label and whether it is here.
    A row whose columns are all -inf gives (-inf, 0, 0, 0, label_x)."""
    m = x.max(dim=-1).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = x - m_safe.unsqueeze(-1)
    e = torch.exp(d)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    t = torch.where(e > 0, d * e, zero).sum(-1)  # -inf columns: e = 0, skip (-inf) * 0
    at = loc.unsqueeze(-1)
    e_y = torch.where(inside, e.gather(-1, at).squeeze(-1), zero)
    # the non-label sum is summed without the label's term, never s - e_y (which cancels as p_y -> 1)
    so = e.scatter(-1, at, torch.where(inside, zero, e.gather(-1, at).squeeze(-1)).unsqueeze(-1)).sum(-1)
    label_x = torch.where(inside, x.gather(-1, at).squeeze(-1), zero)
    return m, so + e_y, so, t, label_x


def _triton_partials(hidden, weight, bias, labels, vocab_start: int, opts: RowOptions, out: Tensor) -> Partials:
    """The Triton fused-head kernel's per-split partials (the same five, split-local) merged like shards."""
    from hero_kernels.backends.triton import linear_entropy_logprob as T

    idx, h, w, b, lab = T._prepare(hidden, weight, bias, labels, opts.ignore_index)
    if h.shape[0] > 0:
        parts, _ = T._launch_partials(h, w, b, lab, float(opts.inv_temperature), int(vocab_start),
                                      T.default_config(hidden.dtype, T.device_arch(hidden.device)))
        merged = torch.stack(tuple(merge_stacked_partials(Partials(*parts))))
        if idx is None:
            return Partials(*merged)
        out.index_copy_(1, idx, merged)
    return Partials(*out)


def stack_partials(parts: Sequence[Partials]) -> Partials:
    """K per-shard Partials of [N] -> one Partials of [K, N] (shard order kept)."""
    return Partials(*(torch.stack([getattr(p, f) for p in parts]) for f in Partials._fields))


def merge_stacked_partials(stacked: Partials) -> Partials:
    """Merge [K, N] partials over K disjoint shards -> [N], rebased to the global max (module docstring).

    Fixed order, so every rank that merges the same gathered tensor gets bitwise identical results.
    """
    M = stacked.m.amax(0)
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    live = torch.isfinite(stacked.m)  # an empty shard (m = -inf) adds nothing, never exp(-inf - (-inf))
    gap = torch.where(live, stacked.m - M_safe, torch.zeros_like(stacked.m))
    a = torch.where(live, torch.exp(gap), torch.zeros_like(gap))
    s = (a * stacked.s).sum(0)
    so = (a * stacked.so).sum(0)
    t = (a * (stacked.t + gap * stacked.s)).sum(0)  # t_k rebased from m_k to M: like-signed terms
    # label_x is nonzero in at most one shard (the one holding the label): a plain sum.
    return Partials(M, s, so, t, stacked.label_x.sum(0))


def finalize(parts: Partials, labels: Tensor, opts: RowOptions = RowOptions()) -> RowStats:
    """RowStats: (logp, H) fp32 [N] and lse float64 [N] from merged partials; masked rows 0 (accurate forms: module
    docstring). lse = float64(M) + float64(log s) unrounded, for the backward's hi + lo split."""
    M = parts.m
    M_safe = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    dy = parts.label_x - M_safe
    e_y = torch.exp(dy)
    dom = e_y >= parts.so
    l1p = torch.log1p(torch.where(dom, parts.so / torch.where(dom, e_y, torch.ones_like(e_y)), torch.zeros_like(e_y)))
    log_s = torch.where(dom, dy + l1p, torch.log(parts.s))
    logp = torch.where(dom, -l1p, dy - log_s)
    H = log_s - parts.t / parts.s
    valid = labels != opts.ignore_index
    zero = torch.zeros((), dtype=M.dtype, device=M.device)
    lse = M.to(torch.float64) + log_s.to(torch.float64)
    return RowStats(torch.where(valid, logp, zero), torch.where(valid, H, zero), torch.where(valid, lse, zero.double()))


def all_reduce_partials(parts: Partials, group=None) -> Partials:
    """Merge this rank's partials with every other rank's in ONE collective (all_gather of [5, N]).

    group: a torch.distributed process group, or None for the default group. Without an initialized
    process group (single process) the partials are returned unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return parts
    world = dist.get_world_size(group)
    if world == 1:
        return parts
    local = torch.stack(tuple(parts)).contiguous()
    gathered: List[Tensor] = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    stacked = torch.stack(gathered, dim=1)  # [5, world, N], rank order
    return merge_stacked_partials(Partials(*stacked))


def shard_backward(hidden: Tensor, weight: Tensor, labels: Tensor, vocab_start: int, saved: RowStats,
                   grads: UpstreamGrads, bias: Optional[Tensor] = None, opts: RowOptions = RowOptions(),
                   impl: str = "auto", max_chunk_bytes: int = 16 << 20) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad_hidden share fp32 [N, D], grad_weight [V_local, D] weight.dtype, grad_bias [V_local] | None).

    saved: the GLOBAL RowStats [N] from ``finalize`` (lse float64; an fp32 lse is widened, lo = 0); saved.logp
    gives the label column its accurate 1 - p_y (None: the plain 1 - exp(x_y - lse), rounding noise as
    p_y -> 1). grads.g, grads.k: fp32 [N] or None (= 0).
    Sum grad_hidden over shards (``all_reduce_grad_hidden``) before casting it to hidden.dtype.
    """
    _check_shard(hidden, weight, bias, labels, vocab_start)
    if _resolve_impl(impl, hidden) == "triton":
        from dataclasses import replace

        from hero_kernels.backends.triton import linear_entropy_logprob as T

        # The shards' forward is the fused partials kernel (fp32 logits, ``_triton_partials``): say so, or the
        # backward would derive the design the unsharded forward of this shape picks (16-bit logits if chunked).
        cfg = replace(T.default_config(hidden.dtype, T.device_arch(hidden.device)), forward_variant="fused")
        return T.backward(hidden, weight, bias, labels, saved, grads, opts, cfg, vocab_start=vocab_start,
                          grad_hidden_dtype=torch.float32)
    logp, H, lse = saved
    grad_logp, grad_H = grads
    N, D = hidden.shape
    V_local = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros((N, D), dtype=torch.float32, device=dev)
    dw = torch.zeros((V_local, D), dtype=torch.float32, device=dev)
    db = None if bias is None else torch.zeros((V_local,), dtype=torch.float32, device=dev)
    idx = torch.nonzero(labels != opts.ignore_index).squeeze(1)
    w32 = weight.to(torch.float32)
    b32 = None if bias is None else bias.to(torch.float32)
    zeros = torch.zeros(N, dtype=torch.float32, device=dev)
    g_all = zeros if grad_logp is None else grad_logp.to(torch.float32)
    k_all = zeros if grad_H is None else grad_H.to(torch.float32)
    lse64 = lse.to(torch.float64)
    lse_hi = lse64.to(torch.float32)
    lse_lo = (lse64 - lse_hi.to(torch.float64)).to(torch.float32)  # lse = hi + lo to ~2^-48 relative
    stats = torch.stack([lse_hi, lse_lo, H.to(torch.float32), g_all, k_all,
                         zeros if logp is None else logp.to(torch.float32)])
    C = _chunk_rows(V_local, max_chunk_bytes)
    for start in range(0, idx.numel(), C):
        rows = idx[start:start + C]
        h32 = hidden.index_select(0, rows).to(torch.float32)
        x = _shard_logits(h32, w32, b32) / opts.temperature
        loc, inside = _local_labels(labels.index_select(0, rows), vocab_start, V_local)
        dz = _shard_dlogits(x, loc, inside, *stats.index_select(1, rows), opts.temperature, logp is not None)
        del x
        dh.index_copy_(0, rows, dz @ w32)
        dw.addmm_(dz.t(), h32)
        if db is not None:
            db += dz.sum(0)
    return dh, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


def _shard_dlogits(x: Tensor, loc: Tensor, inside: Tensor, lse_hi: Tensor, lse_lo: Tensor, H: Tensor, g: Tensor,
                   k: Tensor, logp: Tensor, temperature: float, label_stats: bool) -> Tensor:
    """dz [C, V_local] of the shard's columns x [C, V_local] (already / tau) from the GLOBAL row stats [C];
    lse = lse_hi + lse_lo (fp32 each): log p = (x - hi) - lo, no ulp(lse) error at large offsets."""
    logq = (x - lse_hi.unsqueeze(-1)) - lse_lo.unsqueeze(-1)
    p = torch.exp(logq)
    # off the label: -p (k log p + c) with c = g + k H; -inf columns (p = 0) give 0, never (-inf) * 0
    c = g + k * H
    dz = torch.where(p > 0, -p * (k.unsqueeze(-1) * logq + c.unsqueeze(-1)), torch.zeros((), dtype=x.dtype))
    at = loc.unsqueeze(-1)
    if label_stats:  # g (1 - p_y) - k p_y (log p_y + H) from the forward's accurate logp
        # a masked label (logp = -inf, p_y = 0) has no entropy term: never 0 * (-inf)
        p_y = torch.exp(logp)
        lab = -torch.expm1(logp) * g - k * torch.where(p_y > 0, p_y * (logp + H), torch.zeros_like(p_y))
    else:  # the plain form: the tile's value plus g
        lab = dz.gather(-1, at).squeeze(-1) + g
    dz = dz.scatter(-1, at, torch.where(inside, lab, dz.gather(-1, at).squeeze(-1)).unsqueeze(-1))
    return dz / temperature


def all_reduce_grad_hidden(grad_hidden: Tensor, group=None) -> Tensor:
    """Sum the per-shard grad_hidden shares over ranks (in place; no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
    return grad_hidden


def sharded_linear_entropy_logprob(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    vocab_start: int,
    bias: Optional[Tensor] = None,
    opts: RowOptions = RowOptions(),
    group=None,
    impl: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Forward on this rank's shard + one collective: GLOBAL (logp, H fp32, lse float64) [N], identical on all
    ranks."""
    parts = shard_partials(hidden, weight, labels, vocab_start, bias, opts, impl)
    return finalize(all_reduce_partials(parts, group), labels, opts)
