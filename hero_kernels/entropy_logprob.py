"""Public op: per-token log-prob of the sampled token and entropy of the full next-token distribution.

``logp, H = entropy_logprob(logits, labels, temperature=1.0, ignore_index=-100, impl="auto")``

Registered with ``torch.library`` (``torch.ops.hero_kernels.entropy_logprob``) so torch.compile
(fullgraph=True) traces it as one opaque node; autograd is registered once for every backend.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import _checks
from .backends import RowStats, UpstreamGrads
from .dispatch import backend_module, device_guard, resolve_impl
from .options import RowOptions

__all__ = ["entropy_logprob"]


def entropy_logprob(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
    *,
    inplace_backward: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Log-prob of ``labels`` and entropy (nats) of softmax(logits / temperature), in one pass over V.

    Args:
        logits: [N, V] or [B, T, V] (any leading dims), float16 / bfloat16 / float32 (float64 on CPU).
            The last dim must be the vocabulary and contiguous; then no copy is made for any row stride,
            nor for a [B, T, V] view whose batch stride is not T x row stride (the causal shift
            ``logits[:, :-1]``): the triton / cuda / cpu backends take such a view in one launch, the
            torch backend walks the batch.
        labels: [N] or [B, T] integer token ids; ``ignore_index`` masks a row.
        temperature: sampling temperature tau > 0 (Python float); every quantity uses logits / tau.
        ignore_index: masked rows return logp = H = 0 and get zero gradient.
        impl: "auto" | "triton" | "cuda" | "cpu" | "torch" (see README).
        inplace_backward: write dlogits into the logits buffer during backward (saves one [N, V]
            buffer; the logits must not be needed by anything else afterwards). Eager mode only. Refused
            for a leaf tensor that requires grad (or a view of one) whose memory would be overwritten.

    Non-finite inputs (every backend): -inf logits are masked vocabulary (a masked label gives logp = -inf
    and finite gradients); NaN anywhere in a row, a +inf, or a row whose every column is -inf gives NaN logp
    and H for that row (and a NaN gradient row). A label outside [0, V) that is not ``ignore_index`` raises
    under ``hero_kernels.checks(labels=True)`` (the default for CPU tensors); otherwise (the GPU default,
    no host sync) its row is NaN.

    Returns:
        (logp, H), float32, shaped like ``labels``. Differentiable w.r.t. logits through both.
    """
    opts = RowOptions(temperature, ignore_index)
    _checks.check_tensor("logits", logits, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.check_tensor("labels", labels, _checks.INDEX_DTYPES)
    _checks.check_labels_shape(labels, logits.shape[:-1], "logits.shape[:-1]")
    _checks.check_same_device(logits=logits, labels=labels)
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    impl = resolve_impl(impl, logits.device, logits.dtype, "logits")
    V = logits.shape[-1]
    x = logits if _walk_batch(logits) else logits.reshape(-1, V)
    if x.stride(-1) != 1 or (inplace_backward and _rows_overlap(x)):
        # rows must not overlap when dlogits is written into them (an expanded view has row stride 0)
        x = x.contiguous()
    if inplace_backward and x.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
        _check_inplace_target(logits)  # dlogits would land in the caller's memory
    y = labels.reshape(x.shape[:-1]).long()
    logp, H, _ = torch.ops.hero_kernels.entropy_logprob(
        x, y, opts.temperature, opts.ignore_index, impl, bool(inplace_backward)
    )
    return logp.view(labels.shape), H.view(labels.shape)


def _check_inplace_target(logits: Tensor) -> None:
    root = logits._base if logits._base is not None else logits
    if root.is_leaf and root.requires_grad:
        raise ValueError(
            "inplace_backward=True would overwrite logits, a leaf tensor that requires grad (or a view of one) "
            "and whose values autograd users still see; pass inplace_backward=False, or logits produced by an "
            "op (e.g. the LM head's output)"
        )


def _walk_batch(logits: Tensor) -> bool:
    """[B, T, V] with a contiguous vocab dim whose rows are not evenly strided (batch stride != T x row
    stride, e.g. logits[:, :-1]): flattening to [N, V] would copy it all, so the op passes the view on
    (one launch where the backend is ``BATCHED``, else a loop over B: ``_blocks``)."""
    if logits.dim() != 3 or logits.stride(-1) != 1:
        return False
    B, T, _ = logits.shape
    return B > 1 and T > 1 and logits.stride(0) != T * logits.stride(1)


def _rows_overlap(x: Tensor) -> bool:
    """Do two rows of x ([N, V] or [B, T, V]) share memory (e.g. an expanded view)?"""
    V = x.shape[-1]
    if x.dim() == 2:
        return x.shape[0] > 1 and x.stride(0) < V
    B, T, _ = x.shape
    return (T > 1 and x.stride(1) < V) or (B > 1 and x.stride(0) < T * x.stride(1))


def _batched(mod) -> bool:
    """Does the backend take [B, T, V] (any batch stride) in one launch? (module attribute BATCHED)"""
    return bool(getattr(mod, "BATCHED", False))


def _blocks(logits: Tensor, labels: Tensor, *per_row: Tensor, batched: bool = False):
    """(logits [n, V], labels [n], per-row slices) per block: one block for [N, V] (or for [B, T, V] when the
    backend is ``batched``), else one per batch row of [B, T, V] (each block evenly strided)."""
    if logits.dim() == 2 or batched:
        yield (logits, labels) + per_row
        return
    T = logits.shape[1]
    for b in range(logits.shape[0]):
        yield (logits[b], labels[b]) + tuple(t[b * T:(b + 1) * T] for t in per_row)


# ----------------------------------------------------------------------------------------------
# torch.library registration (ops are opaque to Inductor; data checks live inside them)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hero_kernels::entropy_logprob", mutates_args=())
def _fwd(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, impl: str, inplace_backward: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.check_label_values(labels, logits.shape[-1], ignore_index)
    _checks.check_finite(logits=logits)
    if labels.numel() == 0:
        e = logits.new_empty(0, dtype=torch.float32)
        return e, e.clone(), e.to(torch.float64)
    mod = backend_module(impl, "entropy_logprob")
    opts = RowOptions(temperature, ignore_index)
    with device_guard(logits):
        outs = [mod.forward(x, y, opts) for x, y in _blocks(logits, labels, batched=_batched(mod))]
    if len(outs) == 1:
        return tuple(outs[0])  # the op's schema returns a plain tuple of tensors
    return tuple(torch.cat(parts) for parts in zip(*outs))


@_fwd.register_fake
def _(logits, labels, temperature, ignore_index, impl, inplace_backward):
    n = labels.numel()
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float64))  # lse in float64: backends/__init__.py RowStats


@torch.library.custom_op("hero_kernels::entropy_logprob_backward", mutates_args=())
def _bwd(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Tensor,
    grad_H: Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(out, logits, labels, RowStats(None, H, lse), UpstreamGrads(grad_logp, grad_H),
                   RowOptions(temperature, ignore_index), impl)
    return out


def _backward_into(out, logits, labels, saved: RowStats, grads: UpstreamGrads, opts: RowOptions, impl: str) -> None:
    """dlogits of every block into ``out`` (which may be ``logits`` itself: in-place); saved.lse / saved.H and
    grads [N] split per block like the labels."""
    if labels.numel() == 0:
        return
    mod = backend_module(impl, "entropy_logprob")
    with device_guard(logits):
        b = _batched(mod)
        for (x, y, l, h, g, k), (o, _) in zip(_blocks(logits, labels, saved.lse, saved.H, *grads, batched=b),
                                             _blocks(out, labels, batched=b)):
            mod.backward(x, y, RowStats(None, h, l), UpstreamGrads(g, k), opts, out=o)


@_bwd.register_fake
def _(logits, labels, lse, H, grad_logp, grad_H, temperature, ignore_index, impl):
    return torch.empty_like(logits)


@torch.library.custom_op("hero_kernels::entropy_logprob_backward_", mutates_args=("logits",))
def _bwd_inplace(
    logits: Tensor,
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Tensor,
    grad_H: Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> None:
    _backward_into(logits, logits, labels, RowStats(None, H, lse), UpstreamGrads(grad_logp, grad_H),
                   RowOptions(temperature, ignore_index), impl)


@_bwd_inplace.register_fake
def _(logits, labels, lse, H, grad_logp, grad_H, temperature, ignore_index, impl):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, ignore_index, impl, inplace_backward = inputs
    _, H, lse = output
    ctx.save_for_backward(logits, labels, lse, H)
    ctx.args = (temperature, ignore_index, impl, inplace_backward)
    ctx.mark_non_differentiable(lse)


def _grad_or_zeros(g, like: Tensor) -> Tensor:
    # Upstream grads arrive in the outputs' dtype (float32); keep them fp32 and contiguous for the kernels.
    return torch.zeros_like(like) if g is None else g.to(torch.float32).contiguous()


def _backward(ctx, grad_logp, grad_H, _grad_lse):
    logits, labels, lse, H = ctx.saved_tensors
    temperature, ignore_index, impl, inplace = ctx.args
    g, k = UpstreamGrads(_grad_or_zeros(grad_logp, H), _grad_or_zeros(grad_H, H))
    if inplace:
        torch.ops.hero_kernels.entropy_logprob_backward_(logits, labels, lse, H, g, k, temperature, ignore_index, impl)
        dlogits = logits
    else:
        dlogits = torch.ops.hero_kernels.entropy_logprob_backward(
            logits, labels, lse, H, g, k, temperature, ignore_index, impl
        )
    return dlogits, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)
