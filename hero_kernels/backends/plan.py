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
- ``l2_bytes``: bytes our own tensor-core kernels pull from L2 into the SMs (operand tiles, see
  ``gemm_l2_bytes``; atomics into L2). Every non-external "gemm" entry must give it.
- ``meta["sass_per_elt"]`` / ``meta["elements"]``: a streaming kernel's hot-loop SASS instructions per
  element (the measured count of its build, ``hero_kernels.backends.sass_counts``) and the elements it
  streams; they give the instruction-issue term.
- ``meta["bytes_in_flight_per_sm"]``: the bytes of global loads one SM's resident CTAs have outstanding per hot-loop
  iteration: the kernel's own tile (bytes one CTA loads per iteration) x its resident CTAs per SM, measured on
  its build (``ctas_per_sm``: registers, shared memory and warps from the sm_90a compile report).
  ``meta["load_bytes"]``: the bytes it loads (default ``hbm_bytes``); stores retire without the SM waiting for
  them, so only loads are latency-bound. Together they give the latency term.
- ``kind`` says which terms apply: "gemm" (tensor cores, L2 operand traffic) or "stream" (HBM, issue).
- ``external`` marks work done by a library call (cuBLAS GEMM, a torch op) rather than our kernel.
- ``live_bytes``: the memory model. Device memory the launcher holds while this entry runs BEYOND its
  inputs and the outputs it returns (chunk buffers, fp32 accumulators, input copies, a cast's source);
  ``peak_extra_bytes`` of a plan is the largest. The fused head's target: <= 2% of eager's lower bound
  (``hero_kernels.backends.gemm.eager_peak_bytes``: what eager PyTorch's logits path must hold at its
  peak, [N, V] logits + fp32 log-softmax + fp32 dlogits; eager returns the same gradients on top).

The model (``modeled_terms``): per launch, the largest of
  compute  flops / (tensor-core peak x ``tc_efficiency``)      every GEMM, ours or cuBLAS
  l2       l2_bytes / ``l2_bytes_per_s``                        our tl.dot kernels (cuBLAS: inside its efficiency)
  hbm      hbm_bytes / (HBM peak x ``hbm_efficiency``)
  issue    elements x sass_per_elt / (SMs x 4 schedulers x 32 lanes x ``sm_clock_hz``)
  latency  load_bytes / (bytes_in_flight_per_sm x SMs / ``dram_latency_s``)  (Little's law: a streaming kernel
           cannot read faster than the bytes it keeps in flight per loaded DRAM latency)
plus ``launch_s``, times ``repeats``. The floors of ``benchmarks/roofline.py`` stay at the DATASHEET peaks,
so modeled / floor shows every efficiency term; no term is tuned to make a target hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Tuple

__all__ = ["KernelLaunch", "GPU_SPECS", "GpuSpec", "modeled_seconds", "modeled_terms", "gemm_l2_bytes",
           "sass_per_element", "ctas_per_sm", "load_bytes_per_thread", "launch_peak", "plan_seconds", "peak_extra_bytes", "gpu_spec",
           "fastest_linear_impl", "LINEAR_IMPLS", "HERO_LOSS_PLAN"]


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
    meta: Dict[str, Any] = field(default_factory=dict)  # tiles, splits, chunk size, sass_per_elt, elements
    external: bool = False         # cuBLAS / torch call, not our kernel
    repeats: int = 1               # launched this many times with the same plan (e.g. one per chunk)
    l2_bytes: float = 0.0          # L2 -> SM traffic of our tensor-core kernels (``gemm_l2_bytes``, atomics)
    host_sync: bool = False        # the call blocks the host until the GPU is done (e.g. ``nonzero``)
    live_bytes: float = 0.0        # workspace held while it runs, beyond inputs and returned outputs


def peak_extra_bytes(launches) -> float:
    """The memory model of a plan: the largest ``live_bytes`` of its entries (0 for an empty plan)."""
    return max((float(k.live_bytes) for k in launches), default=0.0)


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet peaks (the floors) and the efficiency constants of the model, each with its source."""

    name: str
    hbm_bytes_per_s: float         # datasheet HBM bandwidth (the floor's)
    bf16_flops_per_s: float        # datasheet dense bf16 tensor-core peak (the floor's)
    fp32_flops_per_s: float        # fp32 (non tensor-core) peak, for fp32 GEMMs without TF32
    l2_bytes: int
    sms: int
    cc: int                        # compute capability, major * 10 + minor: picks the launchers' tile configs
    # Share of the tensor-core peak a large bf16 GEMM reaches: cuBLAS at 8192^3 bf16 was measured at ~790
    # TFLOP/s on this workplace's H200 (0.80 of 989, benchmarks/results/README.md); public H100 SXM runs
    # (700 W, lower sustained clocks) land at ~700-760 TFLOP/s, so 0.75. Applied to every GEMM, cuBLAS or
    # ours: no Triton tl.dot kernel is modeled faster than cuBLAS. The GPU suite measures it per shape
    # (benchmarks/kernel_timings.py, cuBLAS GEMMs of the fused head's shapes): replace it then.
    tc_efficiency: float = 0.75
    # Share of the HBM datasheet bandwidth a streaming copy reaches: a 2 GiB device-to-device copy measured
    # ~4.3 TB/s on this workplace's H200 (0.90 of 4.8; benchmarks/results/README.md); H100 SXM copies land at
    # ~3.0 TB/s of 3.35 in public STREAM-style runs, also ~0.90.
    hbm_efficiency: float = 0.90
    # L2 -> SM bandwidth: Chips and Cheese's H100 microbenchmark ("Nvidia's H100: Funny L2, and Tons of
    # Bandwidth", 2023) measured ~5.5 TB/s of L2 bandwidth on a power-limited 114-SM H100 PCIe; public
    # microbenchmarks put the 132-SM SXM part at ~5.5-7 TB/s. 6.0e12 for both (the H200 has the same GH100
    # die, L2 and clocks). It bounds our tl.dot kernels: a BM x BN tile pulls (BM + BN) * BK * elt bytes
    # from L2 per 2 * BM * BN * BK FLOPs (no TMA multicast across a cluster in our Triton kernels).
    l2_bytes_per_s: float = 6.0e12
    # SM clock under sustained load: 1.755 GHz (the H100 PCIe's max boost in the same article; the SXM part
    # boosts to 1.98 GHz but sustains ~1.75 GHz under a full tensor-core / memory load at 700 W). Issue rate:
    # SMs x 4 schedulers x 1 warp-instruction per cycle (32 lanes each).
    sm_clock_hz: float = 1.755e9
    schedulers_per_sm: int = 4
    # Loaded DRAM latency: how long a load waits while the memory system streams near its bandwidth. IDLE (one
    # dependent load at a time, pointer chasing through arrays far beyond L2, TLB misses included) it is ~655
    # cycles = ~375 ns on an H100 PCIe at 1.755 GHz (gpu-benches by D. Ernst, NHR@FAU:
    # github.com/te42kyfo/gpu-benches, gpu-latency/h100_pcie.txt); under load the queues of the memory
    # controllers add to it. 700 ns (~1.9x the idle figure) is an ASSUMED loaded latency, NOT calibrated on
    # either GPU (the H200's HBM3e is taken as the H100's): replace it with a measured one (a streaming copy's
    # time against its bytes in flight per SM). By Little's law a kernel keeping B bytes of loads in flight per
    # SM reads at most B x SMs / latency: ~16 KB per SM reach 0.9 of an H100's 3.35 TB/s, ~23 KB an H200's 4.8.
    dram_latency_s: float = 700e-9
    launch_s: float = 4e-6         # per-launch overhead assumed by the model
    host_sync_s: float = 20e-6     # a host sync: drain the stream, copy a scalar back, relaunch

    @property
    def tf32_flops_per_s(self) -> float:
        """Dense TF32 tensor-core peak: half the bf16 one on every datasheet since Ampere (A100 156 / 312,
        H100 SXM and H200 495 / 989 TFLOP/s)."""
        return self.bf16_flops_per_s / 2

    @property
    def thread_instr_per_s(self) -> float:
        """Thread-instructions per second (each warp-instruction covers 32 lanes)."""
        return self.sms * self.schedulers_per_sm * 32 * self.sm_clock_hz


GPU_SPECS: Dict[str, GpuSpec] = {
    "h100": GpuSpec("h100", 3.35e12, 989e12, 67e12, 50 * 2**20, 132, 90, tc_efficiency=0.75),
    "h200": GpuSpec("h200", 4.8e12, 989e12, 67e12, 50 * 2**20, 132, 90, tc_efficiency=0.80),
}


def gemm_l2_bytes(flops: float, block_m: int, block_n: int, elt: int) -> float:
    """L2 -> SM operand bytes of a tl.dot kernel with BM x BN output tiles: each K step of BK loads
    (BM + BN) * BK * elt bytes for 2 * BM * BN * BK FLOPs, so bytes = flops * (BM + BN) * elt / (2 BM BN)
    (BK cancels). 128 x 128 bf16: 64 FLOP/B, i.e. 384 TFLOP/s at 6 TB/s of L2, 39 % of the bf16 peak."""
    return flops * (block_m + block_n) * elt / (2.0 * block_m * block_n)


def sass_per_element(key: str) -> Optional[float]:
    """Measured hot-loop SASS instructions per element of one kernel build (``sass_counts.SASS_PER_ELEMENT``,
    regenerated by ``python -m benchmarks.compile_report --issue-table``); None when the build is not there."""
    from hero_kernels.backends import sass_counts

    return sass_counts.SASS_PER_ELEMENT.get(key)


def ctas_per_sm(key: str) -> Optional[int]:
    """Resident CTAs per SM of one kernel build on sm_90a (its registers, shared memory and warps against the
    SM's limits: ``sass_counts.CTAS_PER_SM``, generated with ``SASS_PER_ELEMENT``); None when not there."""
    from hero_kernels.backends import sass_counts

    return getattr(sass_counts, "CTAS_PER_SM", {}).get(key)


def load_bytes_per_thread(key: str) -> Optional[int]:
    """Bytes one thread of a build loads per hot-loop iteration (``sass_counts.LOAD_BYTES_PER_THREAD``, the
    LDG widths of its sm_90a hot loop); None when not there."""
    from hero_kernels.backends import sass_counts

    return getattr(sass_counts, "LOAD_BYTES_PER_THREAD", {}).get(key)


def modeled_terms(launch: KernelLaunch, gpu: GpuSpec, *, flops_per_s: Optional[float] = None) -> Dict[str, float]:
    """Seconds of one launch (one repeat, no overhead) under each bound: compute, l2, hbm, issue, latency."""
    if flops_per_s is None:
        peak = gpu.bf16_flops_per_s * gpu.tc_efficiency
    else:  # an fp32 (FMA-unit) GEMM: its own peak, no tensor-core efficiency
        peak = flops_per_s
    if launch.kind == "gemm" and not launch.external and launch.flops and launch.l2_bytes <= 0:
        raise ValueError(f"{launch.name}: a tensor-core kernel's plan entry must give l2_bytes (gemm_l2_bytes)")
    terms = {"compute": launch.flops / peak, "l2": launch.l2_bytes / gpu.l2_bytes_per_s,
             "hbm": launch.hbm_bytes / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency), "issue": 0.0, "latency": 0.0}
    ipe = launch.meta.get("sass_per_elt")
    if ipe:
        terms["issue"] = launch.meta["elements"] * ipe / gpu.thread_instr_per_s
    in_flight = launch.meta.get("bytes_in_flight_per_sm")
    if in_flight:
        loads = launch.meta.get("load_bytes", launch.hbm_bytes)
        terms["latency"] = loads * gpu.dram_latency_s / (in_flight * gpu.sms)
    return terms


def modeled_seconds(launch: KernelLaunch, gpu: GpuSpec, *, flops_per_s: Optional[float] = None) -> float:
    """Modeled time of one plan entry: its largest term (``modeled_terms``) + launch overhead (+ a host sync),
    times its repeats."""
    t = max(modeled_terms(launch, gpu, flops_per_s=flops_per_s).values()) + gpu.launch_s
    if launch.host_sync:
        t += gpu.host_sync_s
    return t * launch.repeats


def launch_peak(launch: KernelLaunch, gpu: GpuSpec, fp32: bool, tf32: bool = False) -> Optional[float]:
    """The ``flops_per_s`` a launch of an fp32 plan is modeled at. GEMM entries: the TF32 tensor-core term
    (``tf32_flops_per_s`` x ``tc_efficiency``) for cuBLAS calls (``external``) when ``tf32`` (torch's cuBLAS
    TF32 flag, ``dispatch.cublas_tf32``) and for our kernels whose plan says ``meta["precision"] == "tf32"``
    (their own config, whatever torch's flag says), else the FMA-unit peak (IEEE fp32). Everything else (and
    every 16-bit plan): None, the default tensor-core term."""
    if not (fp32 and launch.kind == "gemm"):
        return None
    on_tensor_cores = (tf32 and launch.external) or launch.meta.get("precision") == "tf32"
    return gpu.tf32_flops_per_s * gpu.tc_efficiency if on_tensor_cores else gpu.fp32_flops_per_s


def plan_seconds(launches, gpu: GpuSpec, fp32: bool = False, tf32: bool = False) -> float:
    """Modeled seconds of a whole plan (a list of ``KernelLaunch``) on ``gpu``; fp32: the plan's dtype is fp32;
    tf32: cuBLAS runs fp32 GEMMs on TF32 tensor cores (``launch_peak``)."""
    return sum(modeled_seconds(k, gpu, flops_per_s=launch_peak(k, gpu, fp32, tf32)) for k in launches)


def gpu_spec(name: str, sms: int, cc: int) -> GpuSpec:
    """The model's spec of a GPU: H100 / H200 by name (``GPU_SPECS``); any other GPU as an H100 with its own
    SM count and compute capability (the constants are Hopper's, so only the relative ranking of plans on
    such a GPU is meaningful)."""
    key = next((k for k in GPU_SPECS if k in name.lower()), None)
    if key is not None:
        return GPU_SPECS[key]
    import dataclasses

    return dataclasses.replace(GPU_SPECS["h100"], name=name, sms=sms, cc=cc)


#: The GPU paths of the fused LM head ``impl="auto"`` chooses between, each with the module of its plan.
LINEAR_IMPLS = {"triton": "hero_kernels.backends.triton.linear.launch",
                "cuda": "hero_kernels.backends.cuda.linear_entropy_logprob"}


#: hero_loss's 3-GEMM path (hidden states + LM head): one plan for both GPU impls, ``impl=`` names the row kernels.
HERO_LOSS_PLAN = "hero_kernels.linear_hero_loss"


def fastest_linear_impl(N: int, D: int, V: int, dtype, gpu: GpuSpec, *, has_bias: bool = False,
                        impls=("triton", "cuda"), op: str = "linear_entropy_logprob",
                        tf32: bool = False) -> Tuple[str, Dict[str, float]]:
    """(impl, {impl: modeled seconds}) of the fused LM head's fwd+bwd at (N, D, V) on ``gpu``: the impl
    whose launch plan models fastest (ties: the first in ``impls``). Pure Python, no GPU.
    fp32 plans (``plan_seconds``): the Triton kernels' own dots at the FMA peak (IEEE unless their config's
    allow_tf32), the cuBLAS GEMMs (all of the CUDA path's, the Triton path's chunked-design logits and dh / dW) at
    the FMA peak, or at the TF32 tensor-core term when ``tf32`` (torch's cuBLAS TF32 flag: ``dispatch.cublas_tf32``;
    the Triton plan picks its designs per pass at those prices, as its launchers do).
    op "linear_hero_loss": hero_loss's 3-GEMM path instead (``HERO_LOSS_PLAN``; its default response lengths),
    whose impls differ only in the row kernels (the GEMMs are cuBLAS for both)."""
    import importlib

    import torch

    from hero_kernels.backends import gemm

    if op not in ("linear_entropy_logprob", "linear_hero_loss"):
        raise ValueError(f"op must be 'linear_entropy_logprob' or 'linear_hero_loss', got {op!r}")
    fp32 = gemm.as_dtype(dtype) == torch.float32
    times = {}
    for impl in impls:
        if op == "linear_hero_loss":
            launches = importlib.import_module(HERO_LOSS_PLAN).plan(N, D, V, dtype, pass_="fwd+bwd",
                                                                     has_bias=has_bias, impl=impl)
        else:
            mod = importlib.import_module(LINEAR_IMPLS[impl])
            kw = dict(sms=gpu.sms, arch=gpu.cc, gpu=gpu, tf32=tf32) if impl == "triton" else {}  # its picks too
            launches = mod.plan(N, D, V, dtype, pass_="fwd+bwd", has_bias=has_bias, **kw)
        times[impl] = plan_seconds(launches, gpu, fp32, tf32)
    return min(times, key=times.get), times
