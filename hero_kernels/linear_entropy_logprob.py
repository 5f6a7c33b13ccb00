"""Public op: entropy + log-prob straight from hidden states and the LM head (fused linear).

``logp, H = linear_entropy_logprob(hidden, weight, labels, bias=None, temperature=1.0, ignore_index=-100)``

The [tokens x vocab] logits are never materialized by the Triton backend (forward or backward); the
``torch`` / ``cpu`` / ``cuda`` backends hold at most one [chunk x V] tile. Registered with torch.library.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from .backends import RowStats, UpstreamGrads
from .dispatch import auto_linear_impl, backend_module, device_guard, resolve_impl
from .options import RowOptions

__all__ = ["linear_entropy_logprob"]


def linear_entropy_logprob(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    impl: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """entropy_logprob(hidden @ weight.T + bias, labels) without building the logits.

    Args:
        hidden: [N, D] or [B, T, D], float16 / bfloat16 / float32 (float64 on CPU).
        weight: [V, D] LM-head weight, same dtype as hidden.
        labels: [N] or [B, T] integer ids; ``ignore_index`` rows cost no GEMM work and get zero grad.
        bias: optional [V].
        temperature, ignore_index, impl: as in ``entropy_logprob``; ``"auto"`` on a CUDA device picks the
            Triton or the cuBLAS-chunked CUDA path per shape and GPU by the roofline model
            (``hero_kernels.dispatch.auto_linear_impl``).

    Returns:
        (logp, H), float32, shaped like ``labels``; differentiable w.r.t. hidden, weight and bias.
    """
    h, w, b, y, opts, resolved = prepare_inputs(hidden, weight, labels, bias, temperature, ignore_index, impl)
    if impl == "auto" and resolved == "triton" and h.device.type == "cuda":
        # per shape and GPU: the faster of the Triton and cuBLAS-chunked paths by the roofline model
        resolved = auto_linear_impl(h.shape[0], h.shape[1], w.shape[0], h.dtype, h.device, b is not None)
    impl = resolved
    logp, H, _ = torch.ops.hero_kernels.linear_entropy_logprob(h, w, b, y, opts.temperature, opts.ignore_index, impl)
    return logp.view(labels.shape), H.view(labels.shape)


def prepare_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], temperature: float,
                   ignore_index: int, impl: str) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor, RowOptions, str]:
    """Argument checks of ``linear_entropy_logprob`` -> (hidden [N, D], weight [V, D], bias, labels [N] int64,
    options, resolved impl), last dims contiguous. Shared with the 3-GEMM HERO loss (linear_hero_loss)."""
    opts = RowOptions(temperature, ignore_index)
    _checks.check_tensor("hidden", hidden, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.check_tensor("weight", weight, _checks.FLOAT_DTYPES)
    _checks.check_tensor("labels", labels, _checks.INDEX_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    D = hidden.shape[-1]
    if weight.shape[1] != D:
        raise ValueError(f"weight must be [V, D] with D = hidden.shape[-1] = {D}, got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if bias is not None:
        _checks.check_tensor("bias", bias, _checks.FLOAT_DTYPES)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = ({weight.shape[0]},), got shape {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")
    _checks.check_labels_shape(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    impl = resolve_impl(impl, hidden.device, hidden.dtype, "hidden")
    h = hidden.reshape(-1, D)
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = labels.reshape(-1).long()
    return h, w, b, y, opts, impl


@torch.library.custom_op("hero_kernels::linear_entropy_logprob", mutates_args=())
def _fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.check_label_values(labels, weight.shape[0], ignore_index)
    _checks.check_finite(hidden=hidden, weight=weight, bias=bias)
    if hidden.shape[0] == 0:
        e = hidden.new_empty(0, dtype=torch.float32)
        return e, e.clone(), e.to(torch.float64)
    mod = backend_module(impl, "linear_entropy_logprob")
    with device_guard(hidden):
        # the op's schema returns a plain tuple of tensors, not the backends' RowStats
        return tuple(mod.forward(hidden, weight, bias, labels, RowOptions(temperature, ignore_index)))


@_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, impl):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            hidden.new_empty(n, dtype=torch.float64))  # lse in float64: backends/__init__.py RowStats


@torch.library.custom_op("hero_kernels::linear_entropy_logprob_backward", mutates_args=())
def _bwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    logp: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Tensor,
    grad_H: Tensor,
    temperature: float,
    ignore_index: int,
    impl: str,
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_hidden, grad_weight, grad_bias).

    A custom op cannot return None, so a gradient that is not computed is an empty [0] tensor:
    grad_hidden when ``need_dh`` is False, grad_weight and grad_bias when ``need_dw`` is False (grad_bias
    follows the weight flag: the backends get dW and db from the same pass), grad_bias when bias is None.
    Skipping saves the backends' dh GEMM or the fp32 [V, D] grad_weight accumulation (frozen LM head,
    detached hidden).

    ``logp`` is the forward's (accurate) output: tiled backends that never see a whole row take the label
    column's 1 - p_y from it (-expm1(logp)) instead of cancelling 1 - exp(x_y - lse)."""
    if not (need_dh or need_dw):
        return hidden.new_empty(0), weight.new_empty(0), weight.new_empty(0)
    if hidden.shape[0] == 0:
        dh = torch.zeros_like(hidden) if need_dh else hidden.new_empty(0)
        dW = torch.zeros_like(weight) if need_dw else weight.new_empty(0)
        db = torch.zeros_like(bias) if (bias is not None and need_dw) else weight.new_empty(0)
        return dh, dW, db
    mod = backend_module(impl, "linear_entropy_logprob")
    with device_guard(hidden):
        saved, grads = RowStats(logp, H, lse), UpstreamGrads(grad_logp, grad_H)
        dh, dW, db = mod.backward(hidden, weight, bias, labels, saved, grads, RowOptions(temperature, ignore_index),
                                  need_dh=need_dh, need_dw=need_dw)
    return (
        hidden.new_empty(0) if dh is None else dh,
        weight.new_empty(0) if dW is None else dW,
        weight.new_empty(0) if db is None else db,
    )


@_bwd.register_fake
def _(hidden, weight, bias, labels, logp, lse, H, grad_logp, grad_H, temperature, ignore_index, impl,
      need_dh=True, need_dw=True):
    # Mirrors _bwd exactly: empty [0] tensors for the gradients that are not computed.
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dW = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    db = torch.empty_like(bias) if (bias is not None and need_dw) else weight.new_empty(0)
    return dh, dW, db


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, impl = inputs
    logp, H, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, logp, lse, H)
    ctx.args = (temperature, ignore_index, impl)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_H, _grad_lse):
    hidden, weight, bias, labels, logp, lse, H = ctx.saved_tensors
    temperature, ignore_index, impl = ctx.args
    g = torch.zeros_like(H) if grad_logp is None else grad_logp.to(torch.float32).contiguous()
    k = torch.zeros_like(H) if grad_H is None else grad_H.to(torch.float32).contiguous()
    # Only the gradients autograd asks for: a frozen LM head (LoRA) skips the fp32 [V, D] grad_weight
    # accumulation, a detached hidden skips the dh GEMM. The bias gradient comes from the weight pass.
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and bias is not None)
    need_dh, need_dw = bool(need_h), bool(need_w or need_b)
    dh, dW, db = torch.ops.hero_kernels.linear_entropy_logprob_backward(
        hidden, weight, bias, labels, logp.detach(), lse, H, g, k, temperature, ignore_index, impl,
        need_dh, need_dw,
    )
    return (dh if need_h else None, dW if need_w else None, db if need_b else None,
            None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)
