"""Fused CPU C++ backend (csrc/entropy_logprob_cpu.cpp, csrc/grad_sketch_cpu.cpp via torch.ops.hero_kernels_cpp).

The extension is built on first use (hero_kernels._cpp_build); ``available()`` triggers that build.
"""
from hero_kernels._cpp_build import build_error, cpu_available as available

__all__ = ["available", "build_error"]
