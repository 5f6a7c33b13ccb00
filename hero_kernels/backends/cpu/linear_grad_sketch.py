"""impl="cpu" for linear_grad_sketch: the torch chunk loop (hero_kernels/backends/torch/linear_grad_sketch.py),
whose row chunks run on the CPU GEMMs (no C++ kernel, see backends/cpu/grad_sketch.py)."""
from hero_kernels.backends.torch.linear_grad_sketch import backward, forward

__all__ = ["forward", "backward"]
