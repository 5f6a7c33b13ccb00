"""Launch plans: what a GPU launcher will run, described once, for the launcher and the roofline model alike.

Every GPU launcher (Triton and CUDA, both ops) derives its grid, tiles, vocab splits, chunk sizes and program
order from ONE function, ``plan(...)`` in its own module, and then launches exactly what that plan says.
``benchmarks/roofline.py`` calls the same functions without a GPU, so the model can never drift from what
runs. A plan is a list of ``KernelLaunch`` in launch order.

Conventions
-----------
- ``hbm_bytes`` counts the bytes that cross HBM under the residency assumption written in ``l2_note``
  (which buffers are assumed to stay in L2 and why their working set fits: H100/H200 have 50 MB of L2).
- ``flops`` counts useful multiply-adds as 2 FLOPs (GEMM work), 0 for pure streaming kernels; a recompute
  counts again.
- ``kind`` tells the roofline which peak bounds the kernel: "gemm" (tensor-core FLOP/s) or "stream" (HBM
  bandwidth); the model takes max(flops / peak_flops, hbm_bytes / bandwidth) either way.
- ``external`` marks work done by a library call (cuBLAS GEMM, a torch op) rather than our kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Tuple

__all__ = ["KernelLaunch", "GPU_SPECS", "GpuSpec", "modeled_seconds"]


@dataclass(frozen=True)
class KernelLaunch:
    name: str                      # kernel (or library call) name, e.g. "_fwd_partials_kernel", "cublas_gemm"
    grid: Tuple[int, ...]          # launch grid (programs / CTAs); () for a library call
    kind: Literal["gemm", "stream"]
    flops: float                   # 2 * multiply-adds
    hbm_bytes: float               # bytes moved to/from HBM under ``l2_note``'s assumption
    l2_note: str = ""              # which operands are assumed L2-resident, and why that working set fits
    num_warps: int = 0
    num_stages: int = 0
    meta: Dict[str, int] = field(default_factory=dict)  # constexpr tiles, splits, chunk size, group size
    external: bool = False         # cuBLAS / torch call, not our kernel
    repeats: int = 1               # launched this many times with the same plan (e.g. one per chunk)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float         # peak HBM bandwidth
    bf16_flops_per_s: float        # dense bf16 tensor-core peak
    fp32_flops_per_s: float        # fp32 (non tensor-core) peak, for fp32 GEMMs without TF32
    l2_bytes: int
    sms: int
    launch_s: float = 4e-6         # per-launch overhead assumed by the model


GPU_SPECS: Dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 3.35e12, 989e12, 67e12, 50 * 2**20, 132),
    "h200": GpuSpec("h200", 4.8e12, 989e12, 67e12, 50 * 2**20, 132),
}


def modeled_seconds(launch: KernelLaunch, gpu: GpuSpec, *, flops_per_s: float | None = None) -> float:
    """Roofline time of one plan entry: the slower of its compute and its HBM traffic, plus launch overhead."""
    peak = flops_per_s if flops_per_s is not None else gpu.bf16_flops_per_s
    t = max(launch.flops / peak, launch.hbm_bytes / gpu.hbm_bytes_per_s) + gpu.launch_s
    return t * launch.repeats
