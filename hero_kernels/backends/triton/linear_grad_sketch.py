"""Triton backend of ``linear_grad_sketch``: the gradient sketch through the LM head, no [N, V] logits; per pass
the fused kernels or cuBLAS logits chunks + the row kernels of ``grad_sketch``, whichever ``plan`` models faster.

Entry point; the code lives with the fused entropy head in ``hero_kernels/backends/triton/linear/``
(sketch_kernels.py: the Triton kernels; config.py: ``LinearSketchConfig``; sketch_launch.py: ``plan`` and the
launchers; compile.py: ``SKETCH_KERNEL_CONFIGS``, generated from the kernels' own argument lists).

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N], proj [k, V], opts) -> (a [N, k], stats [N, 2])
backward(hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh, need_dw) -> (dh, dW, db)
plan(N, D, V, dtype, *, k, pass_, has_bias, need_dh, need_dw, gpu) -> SketchPlan (a list[KernelLaunch] + .variants)
"""
from __future__ import annotations

from hero_kernels.backends.triton.linear.compile import SKETCH_KERNEL_CONFIGS as KERNEL_CONFIGS
from hero_kernels.backends.triton.linear.compile import compile_attrs
from hero_kernels.backends.triton.linear.config import LinearSketchConfig, default_sketch_config
from hero_kernels.backends.triton.linear.sketch_launch import SKETCH_K, backward, forward, plan

__all__ = ["LinearSketchConfig", "default_sketch_config", "plan", "forward", "backward", "KERNEL_CONFIGS",
           "compile_attrs", "SKETCH_K"]
