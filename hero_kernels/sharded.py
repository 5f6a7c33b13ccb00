"""Vocab-sharded (tensor-parallel) fused LM head: per-shard partials, one-step merge, per-shard backward.

Each rank holds a weight shard ``W_r`` [V_r, D] with the global vocabulary rows
``[vocab_start_r, vocab_start_r + V_r)`` (and the matching bias slice); every rank sees the same hidden
[N, D] and global labels [N].

Forward
    1. ``shard_partials``: per row, over the shard's columns of x = (h W_r^T + b_r) / tau, the online
       partials ``m = max x``, ``s = sum e^{x-m}``, ``t = sum x e^{x-m}`` and ``label_x`` = x[label] if the
       label lies in the shard, else 0. fp32 [N] each; masked rows give (-inf, 0, 0, 0). On CUDA (or
       under TRITON_INTERPRET) the Triton kernel computes them with no [N, V_r] tensor; on CPU a chunked
       torch loop over ``reference.row_partials``.
    2. ONE collective: ``all_reduce_partials`` all-gathers the [4, N] partials of every rank and each rank
       merges them in rank order with ``reference.merge_partials`` semantics (``merge_stacked_partials``),
       so every rank holds identical merged partials. (A max-then-sum all-reduce would need two steps.)
    3. ``finalize``: ``reference.finalize_partials`` -> (lse, H); logp = label_x - lse; masked rows 0.

Backward (``shard_backward``), given the GLOBAL lse and H from the forward:
    dz_ij = (1/tau) [g_i (1[j=y_i] - p_ij) - k_i p_ij (log p_ij + H_i)],  p_ij = exp(x_ij - lse_i)
    for the shard's columns only. grad_weight / grad_bias are the shard's own (no communication);
    grad_hidden is this shard's share sum_{j in shard} dz_ij W_j in fp32, to be summed over ranks
    (``all_reduce_grad_hidden``) and then cast to the hidden dtype.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from hero_kernels import reference
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
    """Per-row online partials of one vocab shard (or merged), each fp32 [N] (or [K, N] stacked)."""

    m: Tensor
    s: Tensor
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
    if _resolve_impl(impl, hidden) == "triton":
        from hero_kernels.backends.triton.linear_entropy_logprob import forward_partials

        return Partials(*forward_partials(hidden, weight, bias, labels, opts, vocab_start=vocab_start))
    N, V_local = hidden.shape[0], weight.shape[0]
    out = torch.zeros((4, N), dtype=torch.float32, device=hidden.device)
    out[0].fill_(float("-inf"))
    idx = torch.nonzero(labels != opts.ignore_index).squeeze(1)
    w32 = weight.to(torch.float32)
    b32 = None if bias is None else bias.to(torch.float32)
    C = _chunk_rows(V_local, max_chunk_bytes)
    for start in range(0, idx.numel(), C):
        rows = idx[start:start + C]
        x = reference.linear_logits(hidden.index_select(0, rows), w32, b32, torch.float32) / opts.temperature
        m, s, t = reference.row_partials(x)
        loc, inside = _local_labels(labels.index_select(0, rows), vocab_start, V_local)
        lx = torch.where(inside, x.gather(1, loc.unsqueeze(1)).squeeze(1), torch.zeros_like(m))
        out.index_copy_(1, rows, torch.stack((m, s, t, lx)))
    return Partials(*out)


def stack_partials(parts: Sequence[Partials]) -> Partials:
    """K per-shard Partials of [N] -> one Partials of [K, N] (shard order kept)."""
    return Partials(*(torch.stack([getattr(p, f) for p in parts]) for f in Partials._fields))


def merge_stacked_partials(stacked: Partials) -> Partials:
    """Merge [K, N] partials over K disjoint shards in index order -> [N] (``reference.merge_partials``).

    Fixed order, so every rank that merges the same gathered tensor gets bitwise identical results.
    """
    acc = (stacked.m[0], stacked.s[0], stacked.t[0])
    for i in range(1, stacked.m.shape[0]):
        acc = reference.merge_partials(acc, (stacked.m[i], stacked.s[i], stacked.t[i]))
    # label_x is nonzero in at most one shard (the one holding the label): a plain sum.
    return Partials(acc[0], acc[1], acc[2], stacked.label_x.sum(0))


def finalize(parts: Partials, labels: Tensor, opts: RowOptions = RowOptions()) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp, H, lse) fp32 [N] from merged partials; masked rows 0."""
    lse, H = reference.finalize_partials(parts.m, parts.s, parts.t)
    logp = parts.label_x - lse
    valid = labels != opts.ignore_index
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    return torch.where(valid, logp, zero), torch.where(valid, H, zero), torch.where(valid, lse, zero)


def all_reduce_partials(parts: Partials, group=None) -> Partials:
    """Merge this rank's partials with every other rank's in ONE collective (all_gather of [4, N]).

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
    stacked = torch.stack(gathered, dim=1)  # [4, world, N], rank order
    return merge_stacked_partials(Partials(*stacked))


def shard_backward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    vocab_start: int,
    lse: Tensor,
    H: Tensor,
    grad_logp: Optional[Tensor],
    grad_H: Optional[Tensor],
    bias: Optional[Tensor] = None,
    opts: RowOptions = RowOptions(),
    impl: str = "auto",
    max_chunk_bytes: int = 16 << 20,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(grad_hidden share fp32 [N, D], grad_weight [V_local, D] weight.dtype, grad_bias [V_local] | None).

    lse, H: GLOBAL fp32 [N] from ``finalize``. grad_logp, grad_H: fp32 [N] or None (= 0).
    Sum grad_hidden over shards (``all_reduce_grad_hidden``) before casting it to hidden.dtype.
    """
    _check_shard(hidden, weight, bias, labels, vocab_start)
    if _resolve_impl(impl, hidden) == "triton":
        from hero_kernels.backends.triton.linear_entropy_logprob import backward

        return backward(hidden, weight, bias, labels, lse, H, grad_logp, grad_H, opts,
                        vocab_start=vocab_start, grad_hidden_dtype=torch.float32)
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
    lse32, H32 = lse.to(torch.float32), H.to(torch.float32)
    C = _chunk_rows(V_local, max_chunk_bytes)
    for start in range(0, idx.numel(), C):
        rows = idx[start:start + C]
        h32 = hidden.index_select(0, rows).to(torch.float32)
        z = reference.linear_logits(h32, w32, b32, torch.float32)
        dz = reference.entropy_logprob_backward(
            z, labels.index_select(0, rows), g_all.index_select(0, rows), k_all.index_select(0, rows),
            opts.temperature, opts.ignore_index, torch.float32,
            lse=lse32.index_select(0, rows), H=H32.index_select(0, rows), vocab_start=vocab_start,
        )
        del z
        dh.index_copy_(0, rows, dz @ w32)
        dw.addmm_(dz.t(), h32)
        if db is not None:
            db += dz.sum(0)
    return dh, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)


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
    """Forward on this rank's shard + one collective: GLOBAL (logp, H, lse), fp32 [N], identical on all ranks."""
    parts = shard_partials(hidden, weight, labels, vocab_start, bias, opts, impl)
    return finalize(all_reduce_partials(parts, group), labels, opts)
