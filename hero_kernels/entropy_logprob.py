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
            The last dim must be the vocabulary; any row stride is fine (no copy when the last dim is
            contiguous).
        labels: [N] or [B, T] integer token ids; ``ignore_index`` masks a row.
        temperature: sampling temperature tau > 0 (Python float); every quantity uses logits / tau.
        ignore_index: masked rows return logp = H = 0 and get zero gradient.
        impl: "auto" | "triton" | "cuda" | "cpu" | "torch" (see README).
        inplace_backward: write dlogits into the logits buffer during backward (saves one [N, V]
            buffer; the logits must not be needed by anything else afterwards). Eager mode only.

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
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1 or (inplace_backward and x.shape[0] > 1 and x.stride(0) < V):
        # rows must not overlap when dlogits is written into them (an expanded view has row stride 0)
        x = x.contiguous()
    y = labels.reshape(-1).long()
    logp, H, _ = torch.ops.hero_kernels.entropy_logprob(
        x, y, opts.temperature, opts.ignore_index, impl, bool(inplace_backward)
    )
    return logp.view(labels.shape), H.view(labels.shape)


# ----------------------------------------------------------------------------------------------
# torch.library registration (ops are opaque to Inductor; data checks live inside them)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hero_kernels::entropy_logprob", mutates_args=())
def _fwd(
    logits: Tensor, labels: Tensor, temperature: float, ignore_index: int, impl: str, inplace_backward: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.check_label_values(labels, logits.shape[-1], ignore_index)
    _checks.check_finite(logits=logits)
    if logits.shape[0] == 0:
        e = logits.new_empty(0, dtype=torch.float32)
        return e, e.clone(), e.clone()
    with device_guard(logits):
        return backend_module(impl, "entropy_logprob").forward(logits, labels, RowOptions(temperature, ignore_index))


@_fwd.register_fake
def _(logits, labels, temperature, ignore_index, impl, inplace_backward):
    n = logits.shape[0]
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


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
    if logits.shape[0] == 0:
        return torch.empty_like(logits)
    mod = backend_module(impl, "entropy_logprob")
    with device_guard(logits):
        return mod.backward(logits, labels, lse, H, grad_logp, grad_H, RowOptions(temperature, ignore_index))


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
    if logits.shape[0] == 0:
        return
    mod = backend_module(impl, "entropy_logprob")
    with device_guard(logits):
        mod.backward(logits, labels, lse, H, grad_logp, grad_H, RowOptions(temperature, ignore_index), out=logits)


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
    g = _grad_or_zeros(grad_logp, lse)
    k = _grad_or_zeros(grad_H, lse)
    if inplace:
        torch.ops.hero_kernels.entropy_logprob_backward_(logits, labels, lse, H, g, k, temperature, ignore_index, impl)
        dlogits = logits
    else:
        dlogits = torch.ops.hero_kernels.entropy_logprob_backward(
            logits, labels, lse, H, g, k, temperature, ignore_index, impl
        )
    return dlogits, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)
