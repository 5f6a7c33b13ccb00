"""CUDA fused LM head + entropy + log-prob: token chunks through cuBLAS (torch.matmul) into a bounded
[chunk, V] logits buffer, then the fused CUDA row kernels (csrc/entropy_logprob_cuda.cu).

forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, opts) -> (logp, H, lse) fp32 [N]
backward(hidden, weight, bias, labels, lse, H, grad_logp, grad_H, opts)
    -> (grad_hidden [N, D] in hidden.dtype, grad_weight [V, D] in weight.dtype, grad_bias [V] | None)
    need_dh=False / need_dw=False (keywords): that gradient is None and GEMM 2 / GEMM 3 (with db and the
    fp32 grad_weight buffer) is skipped.

Per chunk the backward recomputes the logits (GEMM 1), turns them into dlogits IN PLACE with the row kernel,
then dh = dz @ W (GEMM 2) and dW += dz^T h (GEMM 3, fp32 accumulation: cuBLAS with an fp32 output when
torch offers ``out_dtype``, else an fp32 GEMM on upcast slices). With the forward GEMM that is the 4-GEMM
floor of docs/design.md section 5; peak extra memory is one [chunk, V] buffer plus the fp32 grad_weight.
Masked rows are compacted away first (one host sync for the count). No autograd here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from hero_kernels._cpp_build import require_cuda
from hero_kernels.backends.cpu.linear_entropy_logprob import rows_backward, rows_forward
from hero_kernels.options import RowOptions

__all__ = ["forward", "backward", "CHUNK_BYTES"]

#: Size of the [chunk, V] logits buffer in bytes (bounded memory whatever N is).
CHUNK_BYTES = 1 << 30

#: Vocab rows per fp32 grad_weight update (bounds the fp32 GEMM output buffer to DW_SLICE x D).
DW_SLICE = 16384

_OUT_DTYPE_MM = {"ok": None}  # does torch.mm(..., out_dtype=float32) work here? None until first try


def _chunk_rows(n: int, V: int, elem: int) -> int:
    rows = max(1, CHUNK_BYTES // max(V * elem, 1))
    if rows >= 256:
        rows -= rows % 128  # GEMM-friendly multiple
    return max(1, min(n, rows))


def _accumulate_dw(dW: Tensor, dz: Tensor, h: Tensor) -> None:
    """dW (fp32/fp64) += dz^T @ h without rounding partial sums to dz's dtype.

    bf16/fp16: cuBLAS GEMM with bf16 inputs and an fp32 output (``torch.mm(..., out_dtype=float32)``),
    vocab slice by slice into a bounded fp32 buffer, then added to dW. Where torch lacks ``out_dtype``
    the slice is upcast and multiplied in fp32 (correct, slower).
    """
    if dz.dtype == dW.dtype:
        dW.addmm_(dz.t(), h.to(dW.dtype))
        return
    V = dW.shape[0]
    tmp = None
    for v0 in range(0, V, DW_SLICE):
        v1 = min(V, v0 + DW_SLICE)
        a = dz[:, v0:v1].t()
        if _OUT_DTYPE_MM["ok"] is not False:
            try:
                if tmp is None or tmp.shape[0] != v1 - v0:
                    tmp = torch.empty((v1 - v0, dW.shape[1]), dtype=dW.dtype, device=dW.device)
                torch.mm(a, h, out_dtype=dW.dtype, out=tmp)
                _OUT_DTYPE_MM["ok"] = True
                dW[v0:v1] += tmp
                continue
            except (RuntimeError, TypeError, NotImplementedError):
                if _OUT_DTYPE_MM["ok"]:
                    raise
                _OUT_DTYPE_MM["ok"] = False
        dW[v0:v1].addmm_(a.to(dW.dtype), h.to(dW.dtype))


def forward(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, opts: RowOptions
) -> Tuple[Tensor, Tensor, Tensor]:
    n_valid = int((labels != opts.ignore_index).sum())  # one host sync, as the compaction needs anyway
    step = _chunk_rows(n_valid, weight.shape[0], hidden.element_size())
    return rows_forward(require_cuda(), hidden, weight, bias, labels, opts, step)


def backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    lse: Tensor,
    H: Tensor,
    grad_logp: Tensor,
    grad_H: Tensor,
    opts: RowOptions,
    *,
    logp: Optional[Tensor] = None,  # unused: the row kernels see whole rows and get 1 - p_y right themselves
    need_dh: bool = True,
    need_dw: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    if not (need_dh or need_dw):
        return None, None, None
    step = _chunk_rows(int((labels != opts.ignore_index).sum()), weight.shape[0], hidden.element_size())
    # dlogits in place in the logits chunk; _accumulate_dw keeps grad_weight's partial sums in fp32
    return rows_backward(require_cuda(), hidden, weight, bias, labels, lse, H, grad_logp, grad_H, opts, step,
                         need_dh=need_dh, need_dw=need_dw, fp32_dlogits=False, accumulate_dw=_accumulate_dw)
