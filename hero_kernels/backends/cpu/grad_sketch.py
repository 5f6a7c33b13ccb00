"""impl="cpu" for grad_sketch: the chunked torch path (hero_kernels/backends/torch/grad_sketch.py).

No C++ kernel: on CPU the op is two GEMM-shaped products per row chunk (p @ proj^T forward, v @ proj
backward) that MKL/oneDNN already run near peak, and a fused per-row C++ loop would not beat them.
"""
from hero_kernels.backends.torch.grad_sketch import backward, forward

__all__ = ["forward", "backward"]
