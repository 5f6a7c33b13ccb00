"""impl="cpu" for linear_grad_sketch: row chunks of the LM head (torch's CPU GEMMs for the logits chunk and for
dh / dW) through the C++ row kernels of ``grad_sketch`` (backends/cpu/grad_sketch.py). The chunk loop and its
memory bound (one [C, V] compute-dtype tile, never [N, V]) are in backends/torch/linear_grad_sketch.py; the
backward's dlogits overwrite that tile in place."""
from hero_kernels.backends.torch.linear_grad_sketch import chunked_backward, chunked_forward

from . import grad_sketch as rows
from .linear_entropy_logprob import CHUNK_ELEMENTS

__all__ = ["forward", "backward", "CHUNK_ELEMENTS"]


def forward(hidden, weight, bias, labels, proj, opts):
    return chunked_forward(rows, hidden, weight, bias, labels, proj, opts, CHUNK_ELEMENTS)


def backward(hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh=True, need_dw=True):
    return chunked_backward(rows, hidden, weight, bias, labels, proj, a, stats, grad_a, opts, need_dh, need_dw,
                            CHUNK_ELEMENTS)
