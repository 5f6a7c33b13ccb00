"""Backends of the two ops, one package each: ``torch`` (chunked PyTorch), ``cpu`` (compiled C++), ``cuda``
(compiled CUDA), ``triton``. Each has ``entropy_logprob`` (the row op on logits) and ``linear_entropy_logprob``
(the fused LM head) modules; ``hero_kernels.dispatch.backend_module`` imports them on first use.

The contract every backend module satisfies is written down here as Protocols (checked by
tests/test_numerics_contract.py), with small named tuples for what crosses it:

* ``RowStats(logp, H, lse)``: a forward's per-row results [N], logp / H fp32, lse fp64 (see RowStats; a plain
  tuple to callers that unpack). A backward takes them back as ``saved``.
* ``UpstreamGrads(g, k)``: dL/dlogp and dL/dH, fp32 [N], as the public ops hand them to a backward (``grads``).

So every backward reads ``backward(<inputs>, labels, saved: RowStats, grads: UpstreamGrads, opts, ...)``.

Launchers shared by the compiled backends live in ``cpp_launch``; launch plans (grid, tiles, HBM bytes) for the
GPU launchers and the roofline model in ``plan``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch as _torch  # plain `torch` here would be shadowed by the subpackage backends.torch
from torch import Tensor

from hero_kernels.options import RowOptions

__all__ = ["RowStats", "UpstreamGrads", "RowBackend", "LinearBackend", "compact_rows"]


class RowStats(NamedTuple):
    """Per-row forward results [N]: log-prob of the label, entropy (nats) (float32), log-sum-exp of x = z/tau.

    lse is float64 (m + log s to ~2^-48): its backward splits it into fp32 hi + lo and forms
    log p = (x - hi) - lo, so p carries no ulp(lse) error at large logit offsets (an fp32 lse costs
    ulp(lse)/2 = 1.2e-4 relative on every p at |x| ~ 3e3). The same for the fused heads.
    Masked rows (ignore_index) are 0; rows without a distribution or with a bad label NaN.
    As a backward's ``saved``: logp may be None where the forward's is not at hand (the fused heads then keep
    the tile's own 1 - p_y); the row backends read lse and H only (or recompute them from whole rows)."""

    logp: Tensor
    H: Tensor
    lse: Tensor


class UpstreamGrads(NamedTuple):
    """Upstream gradients of a backward, float32 [N]: g = dL/dlogp, k = dL/dH (zeros when unused; the Triton
    and torch backends also take None for zeros)."""

    g: Tensor
    k: Tensor


@runtime_checkable
class RowBackend(Protocol):
    """``hero_kernels.backends.<impl>.entropy_logprob``. logits [N, V] (or [B, T, V] when the module sets
    ``BATCHED = True``), last-dim stride 1; labels [N] int64."""

    def forward(self, logits: Tensor, labels: Tensor, opts: RowOptions) -> RowStats:
        """-> RowStats(logp, H, lse)."""

    def backward(self, logits: Tensor, labels: Tensor, saved: RowStats, grads: UpstreamGrads, opts: RowOptions,
                 out: Optional[Tensor] = None) -> Tensor:
        """saved: the forward's RowStats [N] (lse, H read); grads: UpstreamGrads [N] -> dlogits (shape and dtype
        of logits, or into ``out``, which may be logits itself)."""


@runtime_checkable
class LinearBackend(Protocol):
    """``hero_kernels.backends.<impl>.linear_entropy_logprob``: the fused LM head, hidden [N, D], weight [V, D],
    bias [V] | None, labels [N]. backward returns (grad_hidden | None, grad_weight | None, grad_bias | None)
    and skips what need_dh / need_dw say is not needed."""

    def forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                opts: RowOptions) -> RowStats:
        """-> RowStats(logp, H, lse)."""

    def backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, saved: RowStats,
                 grads: UpstreamGrads, opts: RowOptions, *, need_dh: bool = True,
                 need_dw: bool = True) -> Tuple[Optional[Tensor], ...]:
        """saved: the forward's RowStats [N] (saved.logp, when not None, gives tiled backends the label column's
        accurate 1 - p_y = -expm1(logp)); grads: UpstreamGrads [N] -> (grad_hidden, grad_weight, grad_bias)."""


def compact_rows(labels: Tensor, ignore_index: int) -> Optional[Tensor]:
    """The fused heads' masked-row compaction: indices [n] int64 of the rows with label != ignore_index, or
    None = every row, in order (then the kernels see the masked rows and must give them 0 results / 0 grads).

    The index needs ``nonzero``, which syncs the host once (the grids and chunk sizes depend on n). During
    CUDA graph capture a sync is not allowed, so there it returns None without looking at the labels: the
    masked rows are computed and zeroed (more GEMM work, same results). None also when no row is masked
    (no gathers / scatters)."""
    if labels.is_cuda and _torch.cuda.is_current_stream_capturing():
        return None
    idx = _torch.nonzero(labels != ignore_index).flatten()
    return None if idx.numel() == labels.numel() else idx
