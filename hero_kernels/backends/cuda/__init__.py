"""CUDA C++ backend (csrc/entropy_logprob_cuda.cu via torch.ops.hero_kernels_cpp).

Built on first use together with the CPU kernels when a CUDA device and nvcc are present.
"""
from hero_kernels._cpp_build import cuda_available as available, cuda_build_error as build_error

__all__ = ["available", "build_error"]
