"""impl="cpu" for grad_sketch: the C++ kernels of csrc/grad_sketch_cpu.cpp through torch.ops.hero_kernels_cpp.

forward(logits [N, V], labels [N] int64, proj [k, V], opts) -> (a [N, k] fp32, stats [N, 2] fp32)
backward(logits, labels, proj, a, stats, grad_a [N, k] fp32, opts, out=None) -> dlogits [N, V] in out's dtype
(logits.dtype when out is None; ``out`` may be ``logits`` itself, or an fp32 tensor for 16-bit logits)

One vocabulary pass per block of rows in the forward: online max, the k-vector proj @ e^{x - m} rescaled on a new
max, the [rows, tile] x [tile, k] products on torch's BLAS; p is never stored. ``stats`` here is the float64
lse of x = z / tau split into fp32 hi + lo (not the torch / Triton backends' (m, log s): the stats only travel
from a backend's forward to its own backward), so the backward's p = exp((x - hi) - lo) has no ulp(lse) error,
and (proj p) . v comes from the saved ``a``: the backward is one pass too, with no softmax normalization pass.
logits: last-dim stride 1, any row stride; bf16 / fp16 / fp32 (fp32 math) or fp64 (fp64 math). proj is
used in fp32 (fp64 for fp64 logits). Masked rows 0; a bad label or a row without a distribution NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hero_kernels._cpp_build import require_cpu
from hero_kernels.backends.torch.grad_sketch import compute_dtype
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward"]


def _proj(proj: Tensor, logits: Tensor) -> Tensor:
    return proj.to(compute_dtype(logits.dtype)).contiguous()


def forward(logits: Tensor, labels: Tensor, proj: Tensor, opts: RowOptions) -> Tuple[Tensor, Tensor]:
    return require_cpu().grad_sketch_fwd(logits, labels.reshape(-1), _proj(proj, logits), opts.inv_temperature,
                                         opts.ignore_index)


def backward(logits: Tensor, labels: Tensor, proj: Tensor, a: Tensor, stats: Tensor, grad_a: Tensor, opts: RowOptions,
             out: Optional[Tensor] = None) -> Tensor:
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    require_cpu().grad_sketch_bwd(logits, labels.reshape(-1), _proj(proj, logits), a, stats,
                                  grad_a.to(torch.float32).contiguous(), opts.inv_temperature, opts.ignore_index, out)
    return out
