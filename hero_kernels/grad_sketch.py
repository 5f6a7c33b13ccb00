"""Public ops: a random projection ("sketch") of each token's log-prob gradient w.r.t. its logits.

``a = grad_sketch(logits, labels, proj, temperature=1.0, ignore_index=-100)``
``a = linear_grad_sketch(hidden, weight, labels, proj, bias=None, ...)``  (through the LM head, no [N, V] logits)

With x = z / tau and p = softmax(x), d log p_y / dz = (1/tau) (e_y - p), so its projection by proj [k, V] is

    a = (1/tau) (proj[:, y] - proj @ p)                                          [..., k] float32

computed in one pass over the vocabulary (Triton: online max rescaling of the k-vector accumulator, p never
stored). Masked rows (label == ignore_index) give 0. Backward for an upstream v = dL/da (proj is constant):

    dL/dz_l = -(p_l / tau^2) (proj[:, l] . v - (proj p) . v)

(proj[:, y] does not depend on z, so there is no label term). Both ops are torch.library custom ops with
autograd, traceable by torch.compile(fullgraph=True). ``proj`` gets no gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _checks
from .dispatch import backend_module, device_guard, resolve_impl
from .options import RowOptions

__all__ = ["grad_sketch", "linear_grad_sketch"]


def _check_proj(proj, V: int) -> None:
    _checks.check_tensor("proj", proj, _checks.FLOAT_DTYPES)
    if proj.dim() != 2 or proj.shape[1] != V or proj.shape[0] == 0:
        raise ValueError(f"proj must be [k, V] with k >= 1 and V = {V} (the vocabulary size), got shape "
                         f"{tuple(proj.shape)}")


def _resolve(impl: str, t: Tensor, arg: str) -> str:
    impl = resolve_impl(impl, t.device, t.dtype, arg)
    if impl == "cuda":
        raise ValueError("impl='cuda' has no grad_sketch kernel; use impl='triton' (or 'auto') on CUDA tensors")
    return impl


def grad_sketch(logits: Tensor, labels: Tensor, proj: Tensor, *, temperature: float = 1.0, ignore_index: int = -100,
                impl: str = "auto") -> Tensor:
    """Projected d log p(label) / d logits, one vocabulary pass.

    Args:
        logits: [..., V] float16 / bfloat16 / float32 (float64 on CPU); non-contiguous views are copied.
        labels: [...] integer ids matching ``logits.shape[:-1]``; ``ignore_index`` rows give 0 and no gradient.
        proj: [k, V] projection (any float dtype; the Triton kernel dots in proj's dtype when it equals the
            logits dtype, else in fp32). Constant: it receives no gradient.
        temperature: tau > 0; every quantity uses logits / tau.
        impl: "auto" | "triton" | "cpu" | "torch" ("cpu": the C++ kernel of csrc/grad_sketch_cpu.cpp).

    Returns:
        float32 [..., k]; differentiable w.r.t. logits.
    """
    opts = RowOptions(temperature, ignore_index)
    _checks.check_tensor("logits", logits, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.check_tensor("labels", labels, _checks.INDEX_DTYPES)
    _checks.check_labels_shape(labels, logits.shape[:-1], "logits.shape[:-1]")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    _check_proj(proj, V)
    _checks.check_same_device(logits=logits, labels=labels, proj=proj)
    impl = _resolve(impl, logits, "logits")
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = labels.reshape(-1).long()
    a, _ = torch.ops.hero_kernels.grad_sketch(x, y, proj.contiguous(), opts.temperature, opts.ignore_index, impl)
    return a.view(*labels.shape, proj.shape[0])


def linear_grad_sketch(hidden: Tensor, weight: Tensor, labels: Tensor, proj: Tensor, *, bias: Optional[Tensor] = None,
                       temperature: float = 1.0, ignore_index: int = -100, impl: str = "auto") -> Tensor:
    """grad_sketch(hidden @ weight.T + bias, labels, proj) without [N, V] logits (row chunks of the LM head).

    Args:
        hidden: [..., D]; weight: [V, D] (same dtype); bias: optional [V]; labels: [...]; proj: [k, V].
        temperature, ignore_index, impl: as in ``grad_sketch``.

    Returns:
        float32 [..., k]; differentiable w.r.t. hidden, weight and bias.
    """
    opts = RowOptions(temperature, ignore_index)
    _checks.check_tensor("hidden", hidden, _checks.FLOAT_DTYPES, min_dim=1)
    _checks.check_tensor("weight", weight, _checks.FLOAT_DTYPES)
    _checks.check_tensor("labels", labels, _checks.INDEX_DTYPES)
    D = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != D or weight.shape[0] == 0:
        raise ValueError(f"weight must be [V, D] with V >= 1 and D = hidden.shape[-1] = {D}, got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    V = weight.shape[0]
    if bias is not None:
        _checks.check_tensor("bias", bias, _checks.FLOAT_DTYPES)
        if tuple(bias.shape) != (V,) or bias.dtype != weight.dtype:
            raise ValueError(f"bias must be [V] = ({V},) with weight's dtype {weight.dtype}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    _check_proj(proj, V)
    _checks.check_labels_shape(labels, hidden.shape[:-1], "hidden.shape[:-1]")
    _checks.check_same_device(hidden=hidden, weight=weight, labels=labels, proj=proj, bias=bias)
    impl = _resolve(impl, hidden, "hidden")
    h = hidden.reshape(-1, D)
    a, _ = torch.ops.hero_kernels.linear_grad_sketch(
        h.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels.reshape(-1).long(),
        proj.contiguous(), opts.temperature, opts.ignore_index, impl)
    return a.view(*labels.shape, proj.shape[0])


def _empty_out(n: int, k: int, like: Tensor) -> Tuple[Tensor, Tensor]:
    """(a [n, k], stats [n, 2]): the sketch and the per-row softmax statistics (m, log s) the backward reuses."""
    return like.new_zeros((n, k), dtype=torch.float32), like.new_zeros((n, 2), dtype=torch.float32)


def _grad_f32(g: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.to(torch.float32).contiguous()


# ----------------------------------------------------------------------------------------------
# torch.library registration: grad_sketch
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hero_kernels::grad_sketch", mutates_args=())
def _fwd(logits: Tensor, labels: Tensor, proj: Tensor, temperature: float, ignore_index: int,
         impl: str) -> Tuple[Tensor, Tensor]:
    _checks.check_label_values(labels, logits.shape[-1], ignore_index)
    _checks.check_finite(proj=proj)
    if labels.numel() == 0:
        return _empty_out(0, proj.shape[0], logits)
    with device_guard(logits):
        return backend_module(impl, "grad_sketch").forward(logits, labels, proj, RowOptions(temperature, ignore_index))


@_fwd.register_fake
def _(logits, labels, proj, temperature, ignore_index, impl):
    n = labels.numel()
    return logits.new_empty((n, proj.shape[0]), dtype=torch.float32), logits.new_empty((n, 2), dtype=torch.float32)


@torch.library.custom_op("hero_kernels::grad_sketch_backward", mutates_args=())
def _bwd(logits: Tensor, labels: Tensor, proj: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, temperature: float,
         ignore_index: int, impl: str) -> Tensor:
    if labels.numel() == 0:
        return torch.zeros_like(logits)
    with device_guard(logits):
        return backend_module(impl, "grad_sketch").backward(logits, labels, proj, a, stats, grad_a,
                                                            RowOptions(temperature, ignore_index))


@_bwd.register_fake
def _(logits, labels, proj, a, stats, grad_a, temperature, ignore_index, impl):
    return torch.empty_like(logits)


def _setup(ctx, inputs, output):
    logits, labels, proj, temperature, ignore_index, impl = inputs
    a, stats = output
    ctx.save_for_backward(logits, labels, proj, a, stats)
    ctx.args = (temperature, ignore_index, impl)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_a, _grad_stats):
    logits, labels, proj, a, stats = ctx.saved_tensors
    dz = torch.ops.hero_kernels.grad_sketch_backward(logits, labels, proj, a, stats, _grad_f32(grad_a, a), *ctx.args)
    return dz, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------
# torch.library registration: linear_grad_sketch
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("hero_kernels::linear_grad_sketch", mutates_args=())
def _lfwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, proj: Tensor, temperature: float,
          ignore_index: int, impl: str) -> Tuple[Tensor, Tensor]:
    _checks.check_label_values(labels, weight.shape[0], ignore_index)
    _checks.check_finite(hidden=hidden, weight=weight, bias=bias, proj=proj)
    if labels.numel() == 0:
        return _empty_out(0, proj.shape[0], hidden)
    with device_guard(hidden):
        return backend_module(impl, "linear_grad_sketch").forward(hidden, weight, bias, labels, proj,
                                                                  RowOptions(temperature, ignore_index))


@_lfwd.register_fake
def _(hidden, weight, bias, labels, proj, temperature, ignore_index, impl):
    n = labels.numel()
    return hidden.new_empty((n, proj.shape[0]), dtype=torch.float32), hidden.new_empty((n, 2), dtype=torch.float32)


@torch.library.custom_op("hero_kernels::linear_grad_sketch_backward", mutates_args=())
def _lbwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, proj: Tensor, a: Tensor,
          stats: Tensor, grad_a: Tensor, temperature: float, ignore_index: int, impl: str, need_dh: bool,
          need_dw: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient that is not computed is an empty [0] tensor (a custom op
    cannot return None): grad_hidden without ``need_dh``, grad_weight / grad_bias without ``need_dw``, grad_bias
    when bias is None."""
    dh = dW = db = None
    if labels.numel() and (need_dh or need_dw):
        with device_guard(hidden):
            dh, dW, db = backend_module(impl, "linear_grad_sketch").backward(
                hidden, weight, bias, labels, proj, a, stats, grad_a, RowOptions(temperature, ignore_index),
                need_dh=need_dh, need_dw=need_dw)
    elif labels.numel() == 0:
        dh = torch.zeros_like(hidden) if need_dh else None
        dW = torch.zeros_like(weight) if need_dw else None
        db = torch.zeros_like(bias) if (need_dw and bias is not None) else None
    return (hidden.new_empty(0) if dh is None else dh, weight.new_empty(0) if dW is None else dW,
            weight.new_empty(0) if db is None else db)


@_lbwd.register_fake
def _(hidden, weight, bias, labels, proj, a, stats, grad_a, temperature, ignore_index, impl, need_dh, need_dw):
    dh = torch.empty_like(hidden) if need_dh else hidden.new_empty(0)
    dW = torch.empty_like(weight) if need_dw else weight.new_empty(0)
    db = torch.empty_like(bias) if (bias is not None and need_dw) else weight.new_empty(0)
    return dh, dW, db


def _lsetup(ctx, inputs, output):
    hidden, weight, bias, labels, proj, temperature, ignore_index, impl = inputs
    a, stats = output
    ctx.save_for_backward(hidden, weight, bias, labels, proj, a, stats)
    ctx.args = (temperature, ignore_index, impl)
    ctx.mark_non_differentiable(stats)


def _lbackward(ctx, grad_a, _grad_stats):
    hidden, weight, bias, labels, proj, a, stats = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = bool(need_b and bias is not None)
    dh, dW, db = torch.ops.hero_kernels.linear_grad_sketch_backward(
        hidden, weight, bias, labels, proj, a, stats, _grad_f32(grad_a, a), *ctx.args, bool(need_h),
        bool(need_w or need_b))
    return (dh if need_h else None, dW if need_w else None, db if need_b else None, None, None, None, None, None)


_lfwd.register_autograd(_lbackward, setup_context=_lsetup)
