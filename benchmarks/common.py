"""Shared benchmark machinery: shapes, timing, peak memory, measured ceilings, byte/FLOP models and floors,
and the JSON / markdown / PNG writers. No benchmark logic here (see ``__main__.py`` and ``impls.py``).

Work models (the floors of the design), ``elt`` = bytes per element of the input dtype:

* logits ops (``entropy_logprob``, ``hero_loss``), logits ``[N, V]``:
  forward reads ``N*V*elt`` bytes; backward reads ``N*V*elt`` and writes ``N*V*elt`` (dlogits), so
  forward+backward moves ``3*N*V*elt``. Floor = bytes / measured copy bandwidth.
* fused LM-head ops (``linear_entropy_logprob``, ``linear_hero_loss``), hidden ``[N, D]``, weight ``[V, D]``:
  forward is one GEMM, ``2*N*D*V`` FLOPs; forward+backward needs at least 4 GEMMs without materializing
  logits (forward, recompute, dh, dW), ``8*N*D*V`` FLOPs. Floor = FLOPs / measured matmul peak
  (the byte term, reading h and W and writing dh and dW, is also computed; the floor is the larger).

Per-row vectors (labels, logp, H, lse: O(N)) are left out of every model: they are < 0.1% of the bytes at
benchmark shapes. ``floor_frac = floor_time / measured_time`` (1.0 = at the floor).
"""
from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from hero.io import atomic_open, atomic_write_bytes, atomic_write_text
from hero.io import write_json as hero_write_json

__all__ = [
    "OPS", "PASSES", "SIZES", "Case", "cases_for", "parse_shapes", "SHAPE_DIMS", "work_model", "floor_seconds",
    "Ceilings", "measure_ceilings", "nominal_for", "sync", "time_fn", "MemoryMeter",
    "device_label", "default_out", "atomic_write", "write_json", "render_markdown", "plot_results",
    "format_table", "finalize_suite",
]

#: every op the suite benchmarks (linear_* = fused LM head; *hero_loss = the full HERO-GRPO loss)
OPS = ("entropy_logprob", "linear_entropy_logprob", "hero_loss", "linear_hero_loss", "grad_sketch",
       "linear_grad_sketch")
#: fwd = no_grad forward (rollout / reference log-probs); fwd+bwd = training step of the op
PASSES = ("fwd", "fwd+bwd")
SIZES = ("tiny", "ci", "full")

LINEAR_OPS = ("linear_entropy_logprob", "linear_hero_loss", "linear_grad_sketch")
SKETCH_OPS = ("grad_sketch", "linear_grad_sketch")
SKETCH_K = 128  #: sketch size k (proj is [k, V]) of the grad_sketch benchmarks: hero.omnex's default k1
LOSS_OPS = ("hero_loss", "linear_hero_loss")


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One op at one shape. N = tokens (rows); loss ops lay them out as B responses x T tokens (N = B*T)."""

    op: str
    N: int
    V: int
    D: int = 0  # hidden size (fused LM-head ops only)
    B: int = 0  # responses (loss ops only)

    @property
    def T(self) -> int:
        return self.N // self.B if self.B else 0

    @property
    def label(self) -> str:
        parts = [f"N={self.N}"]
        if self.B:
            parts = [f"B={self.B}", f"T={self.T}"]
        if self.D:
            parts.append(f"D={self.D}")
        parts.append(f"V={self.V}")
        return ",".join(parts)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["T"] = self.T
        d["label"] = self.label
        return d


def _grid(op: str, rows: Sequence[Tuple[int, ...]]) -> List[Case]:
    out = []
    for r in rows:
        if op in ("entropy_logprob", "grad_sketch"):
            N, V = r
            out.append(Case(op, N, V))
        elif op in ("linear_entropy_logprob", "linear_grad_sketch"):
            N, D, V = r
            out.append(Case(op, N, V, D=D))
        elif op == "hero_loss":
            B, T, V = r
            out.append(Case(op, B * T, V, B=B))
        else:
            B, T, D, V = r
            out.append(Case(op, B * T, V, D=D, B=B))
    return out


# Shapes per size. "full" is the GPU subset of the design grid (V in {32000, 128256, 151936},
# D in {2048, 4096}, N in {4096, 16384, 65536}) chosen to fit ~6 minutes on one H200 including compile
# warm-ups: an N sweep at V=128256 (the plot's x axis), the two other vocabularies at N=16384, and the
# anchors' published cases (Liger GRPO: B=16, T=1024, V=128256 linear; B=16, T=2048, V=151936 logits).
# Cases run in list order and the suite's time budget skips what is left, so the largest come last.
_SHAPES: Dict[str, Dict[str, list]] = {
    "tiny": {  # the in-process test: seconds on 2 CPU cores
        "entropy_logprob": [(16, 512), (32, 512)],
        "linear_entropy_logprob": [(16, 32, 512), (32, 32, 512)],
        "hero_loss": [(2, 8, 512), (2, 16, 512)],
        "linear_hero_loss": [(2, 8, 32, 512), (2, 16, 32, 512)],
        "grad_sketch": [(16, 512)], "linear_grad_sketch": [(16, 32, 512)],
    },
    "ci": {  # CPU default: a real vocabulary (32000) for the logits ops, small D x V for the fused head
        "entropy_logprob": [(64, 32000), (128, 32000), (256, 32000)],
        "linear_entropy_logprob": [(64, 128, 8192), (128, 128, 8192), (256, 128, 8192)],
        "hero_loss": [(4, 16, 32000), (4, 32, 32000), (4, 64, 32000)],
        "linear_hero_loss": [(4, 16, 128, 8192), (4, 32, 128, 8192), (4, 64, 128, 8192)],
        "grad_sketch": [(128, 32000)], "linear_grad_sketch": [(128, 128, 8192)],
    },
    "full": {
        "entropy_logprob": [(16384, 128256), (4096, 128256), (16384, 32000), (16384, 151936), (65536, 128256)],
        "linear_entropy_logprob": [(16384, 4096, 128256), (4096, 4096, 128256), (16384, 2048, 151936),
                                   (65536, 4096, 128256)],
        "hero_loss": [(16, 1024, 128256), (16, 2048, 151936)],
        "linear_hero_loss": [(16, 1024, 4096, 128256), (8, 1024, 2048, 151936)],
        "grad_sketch": [(16384, 128256)], "linear_grad_sketch": [(16384, 4096, 128256)],
    },
}


def cases_for(op: str, size: str, shapes: Optional[Dict[str, list]] = None) -> List[Case]:
    """The op's cases at ``size``, or the rows ``shapes[op]`` when given (``parse_shapes``)."""
    if size not in _SHAPES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return _grid(op, shapes[op] if shapes and op in shapes else _SHAPES[size][op])


#: what one shape row of each op is (``--shapes``)
SHAPE_DIMS = {"entropy_logprob": "NxV", "grad_sketch": "NxV", "linear_entropy_logprob": "NxDxV",
              "linear_grad_sketch": "NxDxV", "hero_loss": "BxTxV", "linear_hero_loss": "BxTxDxV"}


def parse_shapes(text: str) -> Dict[str, list]:
    """``"grad_sketch=512x32000,2048x32000;linear_grad_sketch=128x128x8192"`` -> {op: [(512, 32000), ...]}:
    the shapes of the named ops (the others keep their size's). Raises ValueError naming the bad part."""
    out: Dict[str, list] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        op, eq, rows = part.partition("=")
        op = op.strip()
        if not eq or op not in SHAPE_DIMS:
            raise ValueError(f"--shapes: {part!r} is not OP=SHAPE[,SHAPE...] with OP one of {', '.join(SHAPE_DIMS)}")
        want = SHAPE_DIMS[op].count("x") + 1
        for row in filter(None, (r.strip() for r in rows.split(","))):
            dims = row.lower().split("x")
            if len(dims) != want or not all(d.isdigit() and int(d) > 0 for d in dims):
                raise ValueError(f"--shapes: {op} takes {SHAPE_DIMS[op]} with positive integers, got {row!r}")
            out.setdefault(op, []).append(tuple(int(d) for d in dims))
        if op not in out:
            raise ValueError(f"--shapes: {op} has no shape; give {op}={SHAPE_DIMS[op]}[,...]")
    return out


# ----------------------------------------------------------------------------------------------
# work models and floors
# ----------------------------------------------------------------------------------------------
def work_model(case: Case, pass_: str, elt: int) -> Dict[str, Any]:
    """Bytes and FLOPs the op must at least move / do (module docstring); 'formula' says which."""
    N, V, D = case.N, case.V, case.D
    if case.op in SKETCH_OPS:
        return _sketch_work_model(case, pass_, elt)
    if case.op in LINEAR_OPS:
        io = (N * D + V * D) * elt
        if pass_ == "fwd":
            return {"bytes": io, "flops": 2 * N * D * V,
                    "formula": "flops = 2*N*D*V (one GEMM); bytes = (N*D + V*D)*elt (read h, W)"}
        return {"bytes": 3 * io, "flops": 8 * N * D * V,
                "formula": "flops = 8*N*D*V (fwd, recompute, dh, dW GEMMs); bytes = 3*(N*D + V*D)*elt "
                           "(read h, W in the forward and again in the backward; write dh, dW)"}
    if pass_ == "fwd":
        return {"bytes": N * V * elt, "flops": 0, "formula": "bytes = N*V*elt (read logits once)"}
    return {"bytes": 3 * N * V * elt, "flops": 0,
            "formula": "bytes = 3*N*V*elt (fwd read + bwd read + bwd write of dlogits)"}


def _sketch_work_model(case: Case, pass_: str, elt: int) -> Dict[str, Any]:
    """grad_sketch: the [N, V] x [V, k] product (forward) and [N, k] x [k, V] (backward) on top of the logits
    traffic; the linear variant adds the LM-head GEMMs of linear_entropy_logprob."""
    N, V, D, k = case.N, case.V, case.D, SKETCH_K
    lin = case.op in LINEAR_OPS
    if pass_ == "fwd":
        flops = 2 * N * V * k + (2 * N * D * V if lin else 0)
        nbytes = (N * D + V * D) * elt if lin else N * V * elt
        return {"bytes": nbytes, "flops": flops, "formula": "flops = 2*N*V*k (+ 2*N*D*V linear); bytes = logits "
                "(N*V*elt) or h, W ((N*D + V*D)*elt) read once"}
    flops = 4 * N * V * k + (8 * N * D * V if lin else 0)
    nbytes = 3 * (N * D + V * D) * elt if lin else 3 * N * V * elt
    return {"bytes": nbytes, "flops": flops, "formula": "flops = 4*N*V*k (+ 8*N*D*V linear); bytes as the "
            "entropy ops' fwd+bwd"}


def floor_seconds(model: Dict[str, Any], bandwidth: float, matmul_flops: float) -> float:
    t_bytes = model["bytes"] / bandwidth if bandwidth > 0 else 0.0
    t_flops = model["flops"] / matmul_flops if matmul_flops > 0 else 0.0
    return max(t_bytes, t_flops)


# ----------------------------------------------------------------------------------------------
# device helpers and ceilings
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: torch.device) -> str:
    """'nvidia-h200' for a GPU, 'cpu' otherwise (used in result file names)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"
    return "cpu"


def default_out(device: torch.device, size: str) -> Tuple[str, str]:
    """(directory, file stem): benchmarks/results/ci/bench on CPU, benchmarks/results/<gpu>-<date> on GPU."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if device.type == "cuda":
        date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
        stem = f"{device_label(device)}-{date}" + ("" if size == "full" else f"-{size}")
        return here, stem
    return os.path.join(here, "ci"), "bench" if size == "ci" else f"bench-{size}"


#: Datasheet / previously measured figures, for "measured vs nominal" only (floors use the measured ones).
#: bandwidth in B/s, bf16 dense matmul in FLOP/s. 'ref_*': measured on this workplace's H200
#: (../.library device notes, 2026-10/11: device-to-device copy ~4.3 TB/s, 8192^3 bf16 GEMM ~790 TFLOP/s).
_NOMINAL = (
    ("h200", {"bandwidth": 4.8e12, "bf16_flops": 989e12, "ref_bandwidth": 4.3e12, "ref_bf16_flops": 790e12,
              "source": "H200 SXM datasheet; ref_* measured on this workplace's H200"}),
    ("h100", {"bandwidth": 3.35e12, "bf16_flops": 989e12, "ref_bandwidth": 3.0e12, "ref_bf16_flops": 800e12,
              "source": "H100 SXM datasheet; ref_*: typical measured copy bandwidth and bf16 GEMM rate"}),
    ("a100", {"bandwidth": 2.039e12, "bf16_flops": 312e12, "source": "A100 80GB SXM datasheet"}),
)


def nominal_for(device: torch.device) -> Optional[Dict[str, Any]]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, vals in _NOMINAL:
        if key in name:
            return dict(vals)
    return None


@dataclass
class Ceilings:
    """Measured roofline ceilings of this machine (the floors divide by these)."""

    bandwidth: float  # B/s, counting bytes read + bytes written of a large copy
    matmul_flops: float  # FLOP/s of a large matmul in ``matmul_dtype``
    matmul_dtype: str
    bandwidth_method: str
    matmul_method: str
    nominal: Optional[Dict[str, Any]] = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["bandwidth_GBps"] = self.bandwidth / 1e9
        d["matmul_TFLOPs"] = self.matmul_flops / 1e12
        if self.nominal:
            n = self.nominal
            d["bandwidth_vs_nominal"] = self.bandwidth / n["bandwidth"]
            if self.matmul_dtype == "bfloat16":
                d["matmul_vs_nominal"] = self.matmul_flops / n["bf16_flops"]
                if "ref_bf16_flops" in n:
                    d["matmul_vs_ref"] = self.matmul_flops / n["ref_bf16_flops"]
            if "ref_bandwidth" in n:
                d["bandwidth_vs_ref"] = self.bandwidth / n["ref_bandwidth"]
        return d


def measure_ceilings(device: torch.device, dtype: torch.dtype, size: str) -> Ceilings:
    """Copy bandwidth (bytes read + written) and matmul rate, each the median of timed repeats on random data.

    GPU: a 2 GiB device-to-device copy and an 8192^3 matmul in the benchmark dtype (bf16 by default).
    CPU: a 64 MiB memcpy (torch copy_, all threads) and a 1024^3 fp32 matmul (smaller for size='tiny').
    """
    gpu = device.type == "cuda"
    copy_bytes = (2 << 30) if gpu else ((16 << 20) if size == "tiny" else (64 << 20))
    n = 8192 if gpu else (512 if size == "tiny" else 1024)
    mm_dtype = dtype if gpu else torch.float32

    def copy_time() -> float:
        src = torch.randn(copy_bytes // 4, device=device)
        dst = torch.empty_like(src)
        return time_fn(lambda: dst.copy_(src), device, warmup=2, min_reps=5, max_reps=20, budget_s=0.5)["median_s"]

    def matmul_time() -> float:
        a = torch.randn(n, n, device=device, dtype=mm_dtype)
        b = torch.randn(n, n, device=device, dtype=mm_dtype)
        return time_fn(lambda: a @ b, device, warmup=2, min_reps=5, max_reps=10, budget_s=1.0)["median_s"]

    bw = 2 * copy_bytes / copy_time()
    flops = 2 * n**3 / matmul_time()
    if gpu:
        torch.cuda.empty_cache()
    return Ceilings(
        bandwidth=bw,
        matmul_flops=flops,
        matmul_dtype=str(mm_dtype).replace("torch.", ""),
        bandwidth_method=f"copy_ of {copy_bytes >> 20} MiB fp32 on {device.type}, 2x bytes (read+write), median",
        matmul_method=f"{n}x{n}x{n} {str(mm_dtype).replace('torch.', '')} matmul on random data, median",
        nominal=nominal_for(device),
    )


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 20,
    budget_s: float = 0.25,
) -> Dict[str, Any]:
    """Median wall time of ``fn()`` after ``warmup`` calls (compile / JIT / autotune stay out of the numbers).

    GPU: CUDA events around each call. CPU: perf_counter. Repeats until ``min_reps`` and ``budget_s``
    are both met, at most ``max_reps``. Returns median_s, min_s, max_s, reps.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    t_start = time.perf_counter()
    if device.type == "cuda":
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t_start < budget_s):
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
    else:
        while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - t_start < budget_s):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "reps": len(times)}


# ----------------------------------------------------------------------------------------------
# peak memory
# ----------------------------------------------------------------------------------------------
class MemoryMeter:
    """Peak extra memory of one call, beyond what was allocated before it (inputs are not counted;
    outputs and gradients the call creates are).

    GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    ``memory_allocated`` before the call (the caching allocator's reserve does not count).

    CPU: the process's peak resident set (torch's CPU allocator does not cache). Before the call,
    ``malloc_trim(0)`` hands glibc's free heap pages back to the OS (so re-used heap memory faults in
    again and counts) and writing 5 to ``/proc/self/clear_refs`` resets the peak; the result is ``VmHWM``
    after the call minus ``VmRSS`` before it. Exact to a page for buffers of any size (checked against
    known allocation patterns); nothing changes the allocator's behaviour during the timed runs. Where
    /proc or glibc is missing, memory is reported as unmeasured (None).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "unmeasured"
        self._trim = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before the call"
            return
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._reset_hwm()
            self._status()
        except (OSError, AttributeError, KeyError):
            return
        self.method = "peak RSS delta: malloc_trim(0), /proc/self/clear_refs=5, then VmHWM after - VmRSS before"

    @property
    def available(self) -> bool:
        return self.method != "unmeasured"

    @staticmethod
    def _reset_hwm() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status() -> Dict[str, int]:
        d = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    k, v = line.split(":")
                    d[k] = int(v.split()[0]) * 1024
        return {"hwm": d["VmHWM"], "rss": d["VmRSS"]}

    def measure(self, fn: Callable[[], Any]) -> Optional[int]:
        if not self.available:
            fn()
            return None
        # No gc.collect() here: tensors are freed by reference counting, and a full collection costs
        # ~0.1-0.2 s with torch / triton / sympy loaded (the suite collects once per case instead).
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            out = fn()
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - base
            del out
            return int(max(peak, 0))
        self._trim(0)
        self._reset_hwm()
        before = self._status()["rss"]
        out = fn()
        peak = self._status()["hwm"] - before
        del out
        return int(max(peak, 0))


# ----------------------------------------------------------------------------------------------
# writers
# ----------------------------------------------------------------------------------------------
def atomic_write(path: str, data) -> None:
    """Write ``data`` (str or bytes) to ``path`` atomically (hero.io's writer: temp file, fsync, os.replace)."""
    if isinstance(data, (bytes, bytearray)):
        atomic_write_bytes(path, bytes(data))
    else:
        atomic_write_text(path, data)


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: str, obj) -> None:
    """Strict JSON (NaN / inf -> null, hero.io.json_safe), written atomically."""
    hero_write_json(path, obj, default=_json_default)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool = False) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        if markdown:
            lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
            if j == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        else:
            lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _mib(b) -> Optional[float]:
    return None if b is None else b / 2**20


TIMES_HEAD = ["op", "shape", "pass", "impl", "time ms", "min-max ms", "reps", "modeled_ms", "measured/modeled",
              "peak MiB", "floor frac", "status"]
HEADLINE_HEAD = ["op", "pass", "ours", "anchor", "speedup", "min-max", "memory ratio", "shapes", "note"]
RATIO_HEAD = ["op", "shape", "pass", "ours", "anchor", "speedup", "min-max", "memory ratio", "note"]


def _spread(lo, hi, spec: str = ".3f") -> str:
    return "-" if lo is None or hi is None else f"{format(lo, spec)}-{format(hi, spec)}"


def result_rows(result: dict) -> List[list]:
    """One row per (op, shape, pass, impl): median time, its min-max over the timed repeats, repeats, the
    roofline model's time of the same launch plan (GPU, ours:triton / ours:cuda) and measured/modeled,
    peak memory, floor fraction, status."""
    rows = []
    for op, od in result["ops"].items():
        for case in od.get("cases", []):
            for pass_, per in case["results"].items():
                for impl, r in per.items():
                    status = r["status"] if r["status"] != "ok" else ""
                    rows.append([op, case["shape"]["label"], pass_, impl,
                                 _fmt(r.get("time_ms"), ".3f"), _spread(r.get("time_min_ms"), r.get("time_max_ms")),
                                 _fmt(r.get("reps"), "d"), _fmt(r.get("modeled_ms"), ".3f"),
                                 _fmt(r.get("measured_vs_modeled"), ".2f"), _fmt(_mib(r.get("peak_mem_bytes")), ".1f"),
                                 _fmt(r.get("floor_frac"), ".3f"), status])
    return rows


def ratio_rows(result: dict, primary_only: bool = True) -> List[list]:
    rows = []
    for op, od in result["ops"].items():
        for r in od.get("ratios", []):
            if primary_only and not r.get("primary"):
                continue
            note = f"not in headline: {r['refused']}" if r.get("refused") else ""
            rows.append([op, r["case"], r["pass"], r["ours"], r["anchor"], _fmt(r["speedup"], ".2f"),
                         _spread(r.get("speedup_lo"), r.get("speedup_hi"), ".2f"), _fmt(r["mem_ratio"], ".2f"), note])
    return rows


def headline_title(result: dict) -> str:
    """Smoke sizes (tiny, ci) say so: their ratios show that the harness runs, not how fast anything is."""
    if result.get("smoke"):
        return (f"Smoke results (size {result['size']}: checks that everything runs; NOT a performance "
                f"claim): ours vs each anchor")
    return "Headline: ours vs each anchor (geometric mean over shapes)"


def headline_rows(summary: List[dict]) -> List[list]:
    rows = []
    for s in summary:
        note = ""
        if s.get("n_refused"):
            note = (f"refused: {s['refused']}" if s.get("refused") else
                    f"{s['n_refused']} shape(s) left out (too few repeats or too short)")
        rows.append([s["op"], s["pass"], s["ours"], s["anchor"], _fmt(s["speedup_gmean"], ".2f"),
                     _spread(s.get("speedup_min"), s.get("speedup_max"), ".2f"), _fmt(s["mem_ratio_gmean"], ".2f"),
                     s["n"], note])
    return rows


def group_skipped(skipped: List[dict]) -> List[dict]:
    """Merge per-case entries with the same (op, impl, status, message): 'where' lists the cases."""
    groups: Dict[tuple, dict] = {}
    for s in skipped:
        where, reason = "", s["reason"]
        if s.get("case"):
            where, reason = f"{s['case']} {s.get('pass', '')}".strip(), s.get("message", reason)
        key = (s["op"], s["impl"], s["status"], reason)
        g = groups.setdefault(key, {"op": s["op"], "impl": s["impl"], "status": s["status"], "reason": reason,
                                    "where": []})
        if where:
            g["where"].append(where)
    out = []
    for g in groups.values():
        w = g["where"]
        g["where"] = "all" if not w else (w[0] if len(w) == 1 else f"{len(w)} cases ({w[0]}, ...)")
        out.append(g)
    return out


def render_markdown(result: dict) -> str:
    c = result["ceilings"]
    dev = result["device"]
    out = [f"# hero-kernels benchmarks: {dev['name']} ({result['size']}, {result['dtype']})", ""]
    out.append(f"Created {result['created']}; torch {result['env']['torch']}, triton {result['env'].get('triton')}, "
               f"suite wall time {result.get('wall_s', 0):.1f} s.")
    out.append("")
    out.append("## Ceilings (measured) and floors")
    out.append("")
    line = (f"- copy bandwidth: **{c['bandwidth_GBps']:.1f} GB/s** ({c['bandwidth_method']})")
    if c.get("bandwidth_vs_nominal") is not None:
        line += f"; {100 * c['bandwidth_vs_nominal']:.0f}% of nominal {c['nominal']['bandwidth'] / 1e12:.2f} TB/s"
    out.append(line)
    line = f"- matmul: **{c['matmul_TFLOPs']:.2f} TFLOP/s** ({c['matmul_method']})"
    if c.get("matmul_vs_nominal") is not None:
        line += f"; {100 * c['matmul_vs_nominal']:.0f}% of datasheet {c['nominal']['bf16_flops'] / 1e12:.0f} TFLOP/s"
    if c.get("matmul_vs_ref") is not None:
        line += f", {100 * c['matmul_vs_ref']:.0f}% of the {c['nominal']['ref_bf16_flops'] / 1e12:.0f} TFLOP/s measured before"
    out.append(line)
    out.append("- logits ops: floor = bytes / bandwidth with fwd N*V*elt, fwd+bwd 3*N*V*elt; fused LM head: "
               "floor = FLOPs / matmul peak with fwd 2*N*D*V, fwd+bwd 8*N*D*V. floor frac = floor time / measured.")
    out.append(f"- memory: peak extra bytes of one call beyond its inputs ({result['memory_method']}).")
    out.append("")
    summ = result.get("summary", [])
    if summ:
        out.append(f"## {headline_title(result)}")
        out.append("")
        out.append(format_table(HEADLINE_HEAD, headline_rows(summ), markdown=True))
        out.append("")
        rule = result.get("headline_rule") or {}
        out.append("speedup = anchor time / ours time (geometric mean of the medians over shapes; min-max = the "
                   "widest range the per-repeat times allow: anchor min / ours max .. anchor max / ours min); "
                   "memory ratio = anchor peak memory / ours peak memory (> 1: ours is faster / smaller). "
                   f"A shape enters a headline only with >= {rule.get('min_reps', '?')} timed repeats and medians "
                   f">= {rule.get('min_ms', '?')} ms on both sides.")
        out.append("")
    out.append("## Times and memory")
    out.append("")
    out.append(format_table(TIMES_HEAD, result_rows(result), markdown=True))
    out.append("")
    if result.get("roofline_gpu"):
        out.append(f"modeled_ms: `python -m benchmarks.roofline` for {result['roofline_gpu']} (the launcher's own "
                   "launch plan priced at the datasheet bandwidth and bf16 peak); measured/modeled > 1: slower "
                   "than modeled.")
        out.append("")
    rr = ratio_rows(result)
    if rr:
        out.append("## Ratios per shape (primary ours impl)")
        out.append("")
        out.append(format_table(RATIO_HEAD, rr, markdown=True))
        out.append("")
    skipped = group_skipped(result.get("skipped", []))
    if skipped:
        out.append("## Skipped / failed")
        out.append("")
        out.append(format_table(["op", "impl", "status", "where", "reason"],
                                [[s["op"], s["impl"], s["status"], s["where"], s["reason"].replace("|", "/")]
                                 for s in skipped], markdown=True))
        out.append("")
    notes = result.get("impl_notes", {})
    if notes:
        out.append("## Implementations")
        out.append("")
        by_text: Dict[str, List[str]] = {}
        for key, note in notes.items():  # key: "impl (op)"; one line per distinct text
            by_text.setdefault(note, []).append(key)
        for note, keys in by_text.items():
            names = sorted({k.split(" (")[0] for k in keys})
            ops = [k.split(" (")[1].rstrip(")") for k in keys if " (" in k]
            out.append(f"- `{', '.join(names)}` ({', '.join(ops)}): {note}")
        out.append("")
    if result.get("suite"):
        out.append(render_suite_markdown(result["suite"]))
    return "\n".join(out) + "\n"


def render_suite_markdown(suite: dict) -> str:
    out = ["## GPU suite stages", ""]
    out.append(format_table(["stage", "exit code", "seconds", "note"],
                            [[s["name"], s["rc"], _fmt(s.get("seconds"), ".1f"), s.get("note", "")]
                             for s in suite.get("stages", [])], markdown=True))
    out.append("")
    if suite.get("pytest_summary"):
        out.append(f"pytest: `{suite['pytest_summary']}`")
        out.append("")
    cr = suite.get("compile_report")
    if cr:
        out.append(f"compile report: {cr.get('n_kernels', 0)} kernel builds, {cr.get('n_spills', 0)} with spills, "
                   f"{cr.get('n_errors', 0)} failed to compile.")
        out.append("")
    checks = suite.get("device_checks")
    if isinstance(checks, list):
        bad = [c for c in checks if not c.get("ok")]
        out.append(f"device checks (benchmarks/device_checks.py): {len(checks) - len(bad)}/{len(checks)} passed"
                   + ("; failed: " + "; ".join(f"`{c['check']}`" for c in bad) if bad else "") + ".")
        out.append("")
    kt = suite.get("kernel_timings")
    if isinstance(kt, dict):
        out.append(render_kernel_timings(kt))
    tm = suite.get("trainer_memory")
    if isinstance(tm, dict) and isinstance(tm.get("results"), dict):
        out.append("trainer step memory (benchmarks/bench_trainer_memory.py, " +
                   ", ".join(f"{k}={v}" for k, v in tm.get("args", {}).items() if k in ("vocab", "completion", "device"))
                   + "):")
        out.append("")
        out.append(format_table(["variant", "peak growth MB", "step s"],
                                [[k, _fmt(v.get("delta_mb"), ".1f"), _fmt(v.get("time_s"), ".3f")]
                                 for k, v in tm["results"].items() if isinstance(v, dict)], markdown=True))
        out.append("")
    return "\n".join(out)


def render_kernel_timings(kt: dict) -> str:
    """Markdown of benchmarks/kernel_timings.py: cuBLAS GEMM rates, then per op / impl the pass times and the
    measured vs modeled time of every plan kernel."""
    out = ["## Kernel timings: measured (CUDA events, torch.profiler) vs modeled (benchmarks/roofline.py)", ""]
    g = kt.get("gemms") or []
    if g:
        out.append(format_table(["cuBLAS GEMM", "ms", "TFLOP/s"], [[x["name"], _fmt(x["ms"], ".3f"),
                                                                   _fmt(x["tflops"], ".0f")] for x in g], markdown=True))
        out.append("")
    for r in kt.get("ops", []):
        if "error" in r:
            out.append(f"- `{r['op']}` / {r['impl']}: error: {r['error']}")
            continue
        out.append(f"### {r['op']} / {r['impl']} (N={r['N']}, D={r['D']}, V={r['V']}, {r['dtype']})")
        out.append("")
        out.append(f"fwd {_fmt(r['fwd']['ms'], '.3f')} ms (modeled {_fmt(r['fwd'].get('modeled_ms'), '.3f')}), "
                   f"bwd {_fmt(r['bwd']['ms'], '.3f')} ms, fwd+bwd modeled {_fmt(r.get('fwd+bwd_modeled_ms'), '.3f')} "
                   f"ms, peak extra {_fmt(_mib(r.get('peak_extra_bytes')), '.0f')} MiB"
                   + (f"; model: {r['model_reason']}" if r.get("model_reason") else ""))
        out.append("")
        rows = r.get("by_plan_kernel") or [dict(k, modeled_ms=None) for k in r["fwd"]["kernels"] + r["bwd"]["kernels"]]
        out.append(format_table(["kernel", "measured ms", "modeled ms", "measured/modeled"],
                                [[k["name"][:90].replace("|", "/"), _fmt(k.get("ms"), ".3f"),
                                  _fmt(k.get("modeled_ms"), ".3f"), _fmt(k.get("measured_vs_modeled"), ".2f")]
                                 for k in rows], markdown=True))
        out.append("")
    return "\n".join(out)


def _series_by_n(cases: List[dict]) -> List[dict]:
    """The largest group of cases that differ only in N (the plot's x axis)."""
    groups: Dict[tuple, List[dict]] = {}
    for c in cases:
        s = c["shape"]
        key = (s.get("V"), s.get("D"), s.get("B") if not s.get("B") else None)
        groups.setdefault(key, []).append(c)
    best = max(groups.values(), key=len) if groups else []
    return sorted(best, key=lambda c: c["shape"]["N"])


_COLOR_ORDER = ("ours:triton", "ours:cuda", "ours:cpu", "ours:torch", "eager", "compile", "liger", "cce", "verl")


def _impl_color(name: str) -> str:
    """The same colour for an implementation in every panel."""
    i = _COLOR_ORDER.index(name) if name in _COLOR_ORDER else len(_COLOR_ORDER) + hash(name) % 3
    return f"C{i % 10}"


def plot_results(result: dict, path: str) -> None:
    """Time and peak memory vs N (fwd+bwd solid, fwd dashed), one row of two panels per op; Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op, od in result["ops"].items() if od.get("cases")]
    nrows = max(len(ops), 1)
    fig, axes = plt.subplots(nrows, 2, figsize=(11, 3.2 * nrows), squeeze=False)
    for i, op in enumerate(ops):
        series = _series_by_n(result["ops"][op]["cases"])
        ax_t, ax_m = axes[i]
        impls = []
        for c in series:
            for per in c["results"].values():
                for name in per:
                    if name not in impls:
                        impls.append(name)
        for impl in impls:
            color = _impl_color(impl)
            for pass_, style in (("fwd+bwd", "-"), ("fwd", "--")):
                xs, ts, ms = [], [], []
                for c in series:
                    r = c["results"].get(pass_, {}).get(impl)
                    if r and r.get("status") == "ok":
                        xs.append(c["shape"]["N"])
                        ts.append(r["time_ms"])
                        ms.append(_mib(r.get("peak_mem_bytes")))
                if xs:
                    ax_t.plot(xs, ts, style, marker="o", color=color, label=f"{impl} {pass_}")
                    pts = [(x, m) for x, m in zip(xs, ms) if m is not None and m > 0]
                    if pts:
                        ax_m.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=color,
                                  label=f"{impl} {pass_}")
        fixed = series[0]["shape"] if series else {}
        fx = ", ".join(f"{k}={fixed[k]}" for k in ("V", "D", "B") if fixed.get(k))
        ax_t.set_title(f"{op} time ({fx})", fontsize=9)
        ax_m.set_title(f"{op} peak extra memory ({fx})", fontsize=9)
        ax_t.set_ylabel("ms")
        ax_m.set_ylabel("MiB")
        for ax in (ax_t, ax_m):
            ax.set_xlabel("N (tokens)")
            ax.set_xscale("log", base=2)
            if ax.has_data():
                ax.set_yscale("log")
                ax.legend(fontsize=6, ncol=2)
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"hero-kernels: {result['device']['name']} ({result['size']}, {result['dtype']})", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, dpi=90, format="png")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# environment and suite bookkeeping
# ----------------------------------------------------------------------------------------------
def env_info() -> Dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import hero_kernels

        info["hero_kernels"] = getattr(hero_kernels, "__version__", "?")
    except ImportError:
        info["hero_kernels"] = None
    return info


def device_info(device: torch.device) -> Dict[str, Any]:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "label": device_label(device),
                "capability": list(torch.cuda.get_device_capability(device)), "sm_count": p.multi_processor_count,
                "memory_bytes": p.total_memory}
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"type": "cpu", "name": name or platform.processor() or platform.machine() or "cpu", "label": "cpu",
            "cores": os.cpu_count()}


def finalize_suite(json_path: str, md_path: str, stages_file: str, pytest_log: Optional[str] = None,
                   compile_json: Optional[str] = None, trainer_json: Optional[str] = None,
                   checks_json: Optional[str] = None, timings_json: Optional[str] = None) -> dict:
    """Merge the GPU suite's stage log (lines 'name rc seconds note...') into the benchmark JSON and markdown.

    Creates a minimal JSON when the benchmark stage produced none (it failed or timed out), so every
    suite run leaves a record of what ran.
    """
    stages = []
    if os.path.exists(stages_file):
        with open(stages_file) as f:
            for line in f:
                parts = line.rstrip("\n").split(" ", 3)
                if len(parts) >= 3:
                    stages.append({"name": parts[0], "rc": int(parts[1]), "seconds": float(parts[2]),
                                   "note": parts[3] if len(parts) > 3 else ""})
    suite: Dict[str, Any] = {"stages": stages}
    if pytest_log and os.path.exists(pytest_log):
        with open(pytest_log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        summary = [ln for ln in lines if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
        suite["pytest_summary"] = summary[-1].strip("= ") if summary else (lines[-1] if lines else "")
    if compile_json and os.path.exists(compile_json):
        with open(compile_json) as f:
            cr = json.load(f)
        suite["compile_report"] = {k: cr.get(k) for k in ("n_kernels", "n_spills", "n_errors", "ok")}
        suite["compile_report"]["rows"] = cr.get("rows", [])
    for key, path in (("trainer_memory", trainer_json), ("device_checks", checks_json),
                      ("kernel_timings", timings_json)):
        if path and os.path.exists(path):
            with open(path) as f:
                suite[key] = json.load(f)
    if os.path.exists(json_path):
        with open(json_path) as f:
            result = json.load(f)
        result["suite"] = suite
        write_json(json_path, result)
        atomic_write(md_path, render_markdown(result))
    else:
        result = {"schema": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "suite": suite, "ops": {}, "note": "the benchmark stage wrote no result (see stages)"}
        write_json(json_path, result)
        atomic_write(md_path, "# hero-kernels GPU suite (no benchmark result)\n\n" + render_suite_markdown(suite))
    return result


if __name__ == "__main__":  # used by gpu_suite.sh: python -m benchmarks.common finalize ...
    import sys

    if len(sys.argv) >= 5 and sys.argv[1] == "finalize":
        a = sys.argv[2:] + [None] * (8 - len(sys.argv[2:]))
        finalize_suite(*[x or None for x in a[:8]])
    else:
        print("usage: python -m benchmarks.common finalize RESULT.json RESULT.md STAGES.txt [PYTEST.log] "
              "[COMPILE.json] [TRAINER.json] [CHECKS.json] [TIMINGS.json]  (empty string: none)")
        sys.exit(2)
