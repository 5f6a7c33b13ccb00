"""Triton backend of ``linear_grad_sketch``: row chunks of the LM head (cuBLAS GEMMs in the input dtype, widened to
fp32) through the one-pass Triton row kernels of ``grad_sketch``. Logits exist for one chunk of rows at a time,
never [N, V]; the loop and its memory bound are in backends/torch/linear_grad_sketch.py. A fully fused kernel
(logit tiles kept in registers, as in linear_entropy_logprob) is not written: the chunk's [C, V] fp32 tile is
the only extra memory."""
from hero_kernels.backends.torch.linear_grad_sketch import chunked_backward, chunked_forward

from . import grad_sketch as rows

__all__ = ["forward", "backward", "CHUNK_ELEMENTS"]

#: elements of one fp32 [C, V] logits chunk (512 MiB): ~1000 rows per GEMM at V = 128k
CHUNK_ELEMENTS = 1 << 27


def forward(hidden, weight, bias, labels, proj, opts):
    return chunked_forward(rows, hidden, weight, bias, labels, proj, opts, CHUNK_ELEMENTS)


def backward(hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh=True, need_dw=True):
    return chunked_backward(rows, hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh, need_dw,
                            CHUNK_ELEMENTS)
