"""``python -m benchmarks.roofline``: modeled GPU time of every launcher's real launch plan vs the floor, no GPU.

Each GPU launcher module (``hero_kernels.backends.{triton,cuda}.{entropy_logprob,linear_entropy_logprob}``)
exposes ``plan(...)``: the list of ``KernelLaunch`` (grid, tiles, splits, chunk sizes, FLOPs, HBM bytes and
the L2-residency assumption behind them) that its launcher runs for a shape. This module only CALLS those
functions (it never copies their numbers) and prices each launch with
``hero_kernels.backends.plan.modeled_seconds`` on the H100 SXM and H200 specs in ``GPU_SPECS``: the largest of
tensor-core time at an achievable share of the peak, our tl.dot tiles' L2 -> SM operand traffic, HBM bytes at
an achievable share of the bandwidth, a streaming kernel's measured SASS instructions per element over
the issue rate, and its loaded bytes over the rate its bytes in flight per SM sustain at the
loaded DRAM latency (Little's law; ``hero_kernels.backends.plan``'s docstring). Each kernel row names its limiting
term (``bound``: compute | l2 | hbm | issue | latency) and keeps every term (``terms_s``).

Floors (at the DATASHEET peaks; ``ratio`` > 1 shows every efficiency term), ``elt`` = bytes per element of
the logits / weights dtype:

* ``entropy_logprob`` (logits ``[N, V]``): fwd ``N*V*elt`` bytes, fwd+bwd ``3*N*V*elt`` (forward read,
  backward read, dlogits write), divided by the GPU's HBM bandwidth.
* ``linear_entropy_logprob`` (hidden ``[N, D]``, weight ``[V, D]``): fwd ``2*N*D*V`` FLOPs, fwd+bwd
  ``8*N*D*V`` (forward, recompute, dh, dW GEMMs), divided by the bf16 tensor-core peak (989 TFLOP/s).
* ``linear_hero_loss`` (the HERO loss from hidden states + LM head, ``hero_kernels.linear_hero_loss``: the
  gradients made in the forward, 3 GEMMs per row chunk with the triton or cuda row kernels, the path
  ``hero_loss`` takes for training with ``entropy_grad=False``): ``6*N*D*V`` FLOPs (logits, dh, dW) over the
  bf16 peak, fwd+bwd rows only (its forward does all the work). Each row also gives ``generic_floor_s`` (the fused head's ``8*N*D*V`` floor,
  what a user swapping ops compares) and ``ratio_generic``, and ``responses`` (valid tokens per response:
  ``HERO_RESPONSES`` "closed" = every response fits in a chunk, "open" = responses longer than a chunk,
  which add the fp32 [V, D] accumulator X). The name is the benchmark suite's (``benchmarks.common.OPS``:
  ``hero_loss`` there is the loss from logits, which has no GEMM).
* ``linear_grad_sketch`` (the same head with a ``[k, V]`` projection, k = ``SKETCH_K`` = 128): the head's GEMMs
  plus the sketch products, fwd ``2*N*D*V + 2*N*V*k`` (logits, e @ proj^T), fwd+bwd ``8*N*D*V + 4*N*V*k``
  (+ the backward's v @ proj), over the same peak.

``ratio = modeled_s / floor_s``.

Memory (fused head): ``peak_extra_bytes`` is the plan's memory model (``plan.peak_extra_bytes``: the most
device memory a launcher holds beyond its inputs and the outputs it returns), ``eager_peak_bytes`` eager
PyTorch's lower bound ``N*V*(elt + 8)`` ([N, V] logits in the input dtype + fp32 log-softmax + fp32
dlogits; ``hero_kernels.backends.gemm.eager_peak_bytes``), ``extra_share`` their ratio (target <= 0.02).

A launcher without ``plan`` yields a row with ``status`` "no plan" and
reason "no plan (launcher not ported)", a plan that raises yields ``status`` "error": never a crash.

    python -m benchmarks.roofline                         # the design grid, both GPUs, table on stdout
    python -m benchmarks.roofline --json OUT.json --gpu h100 --op linear_entropy_logprob
    python -m benchmarks.roofline --shapes headline       # only the two headline shapes
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from hero_kernels.backends import gemm
from hero_kernels.backends.plan import (GPU_SPECS, GpuSpec, KernelLaunch, launch_peak, modeled_seconds,
                                        modeled_terms, peak_extra_bytes)

from . import common as C

__all__ = ["IMPL_MODULES", "NO_PLAN", "floor_seconds", "model_row", "rows_for", "shapes", "modeled_for",
           "gpu_key", "main"]

OPS = ("entropy_logprob", "linear_entropy_logprob", "linear_grad_sketch", "linear_hero_loss")
#: (op, impl) -> the launcher module whose ``plan`` describes what that impl runs on a GPU (the sketch: Triton
#: only, the CUDA backend has no sketch kernel)
IMPL_MODULES: Dict[Tuple[str, str], str] = {
    (op, impl): f"hero_kernels.backends.{impl}.{op}" for op in OPS for impl in ("triton", "cuda")
    if (op, impl) != ("linear_grad_sketch", "cuda") and op != "linear_hero_loss"
}
#: the 3-GEMM HERO loss: one chunk loop (cuBLAS GEMMs) with either backend's row kernels (its plan's ``impl=``)
IMPL_MODULES.update({("linear_hero_loss", impl): "hero_kernels.linear_hero_loss" for impl in ("triton", "cuda")})
#: response lengths (valid tokens) of the linear_hero_loss rows: {name: tokens per response}; "closed" responses
#: fit in a chunk, "open" ones span chunks (the X accumulator, deferred dh rows)
HERO_RESPONSES = {"closed": 1024, "open": 8192}
#: sketch size k of the linear_grad_sketch rows: the benchmarks' (hero.omnex's default k1), passed to its plan
SKETCH_K = C.SKETCH_K
NO_PLAN = "no plan (launcher not ported)"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Shapes. "headline": the two targets of the design; "design": its whole grid (V in {32000, 128256, 151936},
# D in {2048, 4096}, N in {4096, 16384, 65536}); "bench": the GPU benchmark's own shapes (size full), so a
# measured row always has its modeled twin.
_HEADLINE = {"entropy_logprob": [(16384, 0, 151936)], "linear_entropy_logprob": [(16384, 4096, 128256)],
             "linear_grad_sketch": [(16384, 4096, 151936)], "linear_hero_loss": [(16384, 4096, 128256)]}
_NS, _DS, _VS = (4096, 16384, 65536), (2048, 4096), (32000, 128256, 151936)


def shapes(which: str = "design") -> Dict[str, List[Tuple[int, int, int]]]:
    """{op: [(N, D, V)]} (D = 0 for the logits op); the headline shapes first, duplicates dropped."""
    out = {op: list(_HEADLINE[op]) for op in OPS}
    if which in ("design", "all"):
        out["entropy_logprob"] += [(n, 0, v) for n, v in itertools.product(_NS, _VS)]
        for op in ("linear_entropy_logprob", "linear_grad_sketch", "linear_hero_loss"):
            out[op] += [(n, d, v) for n, d, v in itertools.product(_NS, _DS, _VS)]
    if which in ("bench", "all"):
        for op in OPS:
            if op in C.OPS:
                out[op] += [(c.N, c.D, c.V) for c in C.cases_for(op, "full")]
    elif which not in ("design", "headline"):
        raise ValueError(f"shapes must be one of headline, design, bench, all; got {which!r}")
    return {op: list(dict.fromkeys(v)) for op, v in out.items()}


def floor_seconds(op: str, pass_: str, N: int, D: int, V: int, elt: int, gpu: GpuSpec) -> float:
    """The floor of the module docstring: HBM bytes for the logits op, GEMM FLOPs for the fused head."""
    if op == "entropy_logprob":
        return (1 if pass_ == "fwd" else 3) * N * V * elt / gpu.hbm_bytes_per_s
    if op == "linear_hero_loss":
        return 6 * N * D * V / gpu.bf16_flops_per_s
    if op == "linear_grad_sketch":
        fwd = pass_ == "fwd"
        return ((2 if fwd else 8) * N * D * V + (2 if fwd else 4) * N * V * SKETCH_K) / gpu.bf16_flops_per_s
    return (2 if pass_ == "fwd" else 8) * N * D * V / gpu.bf16_flops_per_s


def _call_plan(op: str, impl: str, pass_: str, N: int, D: int, V: int, dtype: torch.dtype,
               **kw) -> Tuple[Optional[List[KernelLaunch]], str, Optional[str]]:
    """(launches, status, reason): status ok | no plan | error."""
    name = IMPL_MODULES[(op, impl)]
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - reported in the row
        return None, "error", f"import {name} failed: {type(e).__name__}: {e}"
    fn = getattr(mod, "plan", None)
    if fn is None:
        return None, "no plan", NO_PLAN
    try:
        if op == "entropy_logprob":
            launches = fn(N, V, dtype, pass_=pass_, **kw)
        elif op == "linear_grad_sketch":
            launches = fn(N, D, V, dtype, k=SKETCH_K, pass_=pass_, **kw)
        elif op == "linear_hero_loss":  # one plan for both impls: impl names the row kernels
            launches = fn(N, D, V, dtype, pass_=pass_, impl=impl, **kw)
        else:
            launches = fn(N, D, V, dtype, pass_=pass_, **kw)
    except Exception as e:  # noqa: BLE001 - a plan that refuses a shape is a row, not a crash
        return None, "error", f"{name}.plan raised {type(e).__name__}: {str(e).strip()[:300]}"
    if not isinstance(launches, list):
        launches = list(launches)
    bad = [type(x).__name__ for x in launches if not isinstance(x, KernelLaunch)]
    if bad or not launches:
        return None, "error", f"{name}.plan returned {bad or 'no launches'} instead of a list of KernelLaunch"
    return launches, "ok", None


def _kernel_row(k: KernelLaunch, gpu: GpuSpec, fp32: bool) -> Dict[str, Any]:
    peak = launch_peak(k, gpu, fp32)
    terms = modeled_terms(k, gpu, flops_per_s=peak)
    return {"name": k.name, "grid": list(k.grid), "kind": k.kind, "repeats": k.repeats, "external": k.external,
            "flops": k.flops * k.repeats, "hbm_bytes": k.hbm_bytes * k.repeats, "l2_bytes": k.l2_bytes * k.repeats,
            "modeled_s": modeled_seconds(k, gpu, flops_per_s=peak), "bound": max(terms, key=terms.get),
            "terms_s": {n: t * k.repeats for n, t in terms.items()}, "host_sync": k.host_sync,
            "num_warps": k.num_warps, "num_stages": k.num_stages, "meta": dict(k.meta), "l2_note": k.l2_note}


def model_row(op: str, impl: str, pass_: str, N: int, D: int, V: int, dtype: str = "bf16", gpu: str = "h100",
              **plan_kw) -> Dict[str, Any]:
    """One roofline row (keys: op, pass, N, D, V, dtype, gpu, impl, status, reason, modeled_s, floor_s, ratio,
    flops, hbm_bytes, kernels [per launch, in launch order], l2_notes; the fused head's rows also
    peak_extra_bytes, eager_peak_bytes, extra_share; the Triton fused heads' rows (entropy and sketch) also variants:
    {"forward" | "backward": {"pick", "modeled_s": {design: modeled seconds of that pass}, "forced"}})."""
    spec = GPU_SPECS[gpu]
    tdt = _DTYPES[dtype]
    elt = torch.empty((), dtype=tdt).element_size()
    row: Dict[str, Any] = {"op": op, "pass": pass_, "N": N, "D": D if op != "entropy_logprob" else 0, "V": V,
                           "dtype": dtype, "gpu": gpu, "impl": impl,
                           "floor_s": floor_seconds(op, pass_, N, D, V, elt, spec),
                           "modeled_s": None, "ratio": None, "status": "ok", "reason": None}
    if op == "linear_grad_sketch" or (op, impl) == ("linear_entropy_logprob", "triton"):
        plan_kw.setdefault("gpu", gpu)  # its plan picks each pass's design by this model: price it on this GPU
    if op == "linear_hero_loss":
        row["responses"] = _responses(plan_kw.get("lengths"))
    launches, row["status"], row["reason"] = _call_plan(op, impl, pass_, N, D, V, tdt, **plan_kw)
    if launches is None:
        return row
    if getattr(launches, "variants", None):  # the sketch: both designs of each pass, modeled, and the picks
        row["variants"] = {w: dict(v, modeled_s=dict(v["modeled_s"])) for w, v in launches.variants.items()}
    ks = [_kernel_row(k, spec, tdt == torch.float32) for k in launches]
    row["kernels"] = ks
    row["modeled_s"] = sum(k["modeled_s"] for k in ks)
    row["ratio"] = row["modeled_s"] / row["floor_s"] if row["floor_s"] > 0 else None
    row["flops"] = sum(k["flops"] for k in ks)
    row["hbm_bytes"] = sum(k["hbm_bytes"] for k in ks)
    row["l2_notes"] = list(dict.fromkeys(k["l2_note"] for k in ks if k["l2_note"]))
    if op == "linear_hero_loss":
        row["generic_floor_s"] = floor_seconds("linear_entropy_logprob", "fwd+bwd", N, D, V, elt, spec)
        row["ratio_generic"] = row["modeled_s"] / row["generic_floor_s"]
    if op in ("linear_entropy_logprob", "linear_hero_loss"):
        row["peak_extra_bytes"] = peak_extra_bytes(launches)
        row["eager_peak_bytes"] = gemm.eager_peak_bytes(N, V, elt)
        row["extra_share"] = row["peak_extra_bytes"] / row["eager_peak_bytes"]
    return row


def hero_lengths(N: int, tokens: int) -> List[int]:
    """Valid tokens per response: N tokens in responses of ``tokens`` (the last one shorter)."""
    return [tokens] * (N // tokens) + ([N % tokens] if N % tokens else [])


def _responses(lengths: Optional[Sequence[int]]) -> str:
    """'16x1024' / '2x8192+1x100' (None: the plan's default)."""
    if lengths is None:
        return "default"
    counts: Dict[int, int] = {}
    for n in lengths:
        counts[n] = counts.get(n, 0) + 1
    return "+".join(f"{c}x{n}" for n, c in counts.items())


def rows_for(which: str = "design", gpus: Sequence[str] = ("h100", "h200"), ops: Sequence[str] = OPS,
             impls: Sequence[str] = ("triton", "cuda"), passes: Sequence[str] = C.PASSES,
             dtype: str = "bf16") -> List[Dict[str, Any]]:
    out = []
    grid = shapes(which)
    for op in ops:
        for (N, D, V), pass_, gpu, impl in itertools.product(grid[op], passes, gpus, impls):
            if (op, impl) not in IMPL_MODULES:
                continue
            if op != "linear_hero_loss":
                out.append(model_row(op, impl, pass_, N, D, V, dtype, gpu))
            elif pass_ == "fwd+bwd":  # its forward does all the work: no fwd-only row
                out += [model_row(op, impl, pass_, N, D, V, dtype, gpu, lengths=hero_lengths(N, t))
                        for t in HERO_RESPONSES.values()]
    return out


# ----------------------------------------------------------------------------------------------
# used by ``python -m benchmarks`` to put the modeled time next to every measured GPU time
# ----------------------------------------------------------------------------------------------
def gpu_key(device_name: str) -> Optional[str]:
    """'h100' / 'h200' from a CUDA device name, None for a GPU the model has no spec for."""
    n = device_name.lower()
    return next((k for k in GPU_SPECS if k in n), None)


_CACHE: Dict[tuple, Dict[str, Any]] = {}


def modeled_for(op: str, impl: str, pass_: str, N: int, D: int, V: int, dtype: torch.dtype,
                gpu: Optional[str], **plan_kw) -> Optional[Dict[str, Any]]:
    """The model row of an ``ours:<impl>`` measurement (None when there is nothing to model: CPU backends,
    other ops, unknown GPU or dtype). Cached: the benchmark asks once per case and pass. plan_kw: passed
    to the plan (linear_hero_loss: ``lengths``)."""
    dt = next((k for k, v in _DTYPES.items() if v == dtype), None)
    if gpu not in GPU_SPECS or (op, impl) not in IMPL_MODULES or dt is None:
        return None
    if op == "linear_hero_loss" and pass_ != "fwd+bwd":  # a no-grad forward runs the fused head, not this path
        return None
    key = (op, impl, pass_, N, D, V, dt, gpu, repr(sorted(plan_kw.items())))
    if key not in _CACHE:
        _CACHE[key] = model_row(op, impl, pass_, N, D, V, dt, gpu, **plan_kw)
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------
def _ms(x: Optional[float]) -> str:
    return C._fmt(None if x is None else 1e3 * x, ".3f")


def table_rows(rows: Iterable[Dict[str, Any]]) -> List[list]:
    out = []
    for r in rows:
        top = ""
        if r.get("kernels"):
            k = max(r["kernels"], key=lambda k: k["modeled_s"])
            top = f"{k['name']} {100 * k['modeled_s'] / r['modeled_s']:.0f}% ({k['bound']})"
        mem = ""
        if r.get("peak_extra_bytes") is not None:
            mem = f"{r['peak_extra_bytes'] / 1e9:.2f} GB ({100 * r['extra_share']:.1f}%)"
        impl, ratio = r["impl"], C._fmt(r["ratio"], ".2f")
        if r["op"] == "linear_hero_loss":  # its responses, and the ratio to the generic op's 8NDV floor beside
            impl = f"{impl} {r['responses']}"
            ratio += f" (8NDV: {C._fmt(r.get('ratio_generic'), '.2f')})"
        out.append([r["op"], r["pass"], r["N"], r["D"], r["V"], r["gpu"], impl, _ms(r["modeled_s"]),
                    _ms(r["floor_s"]), ratio, mem, top if r["status"] == "ok" else r["reason"]])
    return out


HEAD = ["op", "pass", "N", "D", "V", "gpu", "impl", "modeled ms", "floor ms", "ratio", "extra mem (of eager)",
        "largest kernel / status"]


def variant_lines(rows: Iterable[Dict[str, Any]]) -> List[str]:
    """One line per pass whose plan chose between designs: each design's modeled time of that pass and the pick."""
    out = []
    for r in rows:
        for which, v in r.get("variants", {}).items():
            how = "forced by config / env" if v["forced"] else "faster by the model"
            ms = ", ".join(f"{n} {_ms(s)} ms" for n, s in v["modeled_s"].items())
            out.append(f"{r['op']} {r['pass']} N={r['N']} D={r['D']} V={r['V']} {r['gpu']} {r['impl']}: {which} "
                       f"{ms} -> {v['pick']} ({how})")
    return out


def render_markdown(rows: List[Dict[str, Any]]) -> str:
    out = ["# Roofline model of the GPU launch plans", "",
           "modeled = sum over the launcher's plan of max(FLOPs / (peak x tensor-core efficiency), L2 -> SM operand "
           "bytes / L2 bandwidth, HBM bytes / (bandwidth x HBM efficiency), elements x SASS per element / issue "
           "rate, loaded bytes x loaded DRAM latency / (bytes in flight per SM x SMs)) + launch overhead (constants in hero_kernels.backends.plan.GpuSpec); "
           "floor = N*V*elt (fwd) or 3*N*V*elt (fwd+bwd) bytes / bandwidth for the logits op, 2*N*D*V (fwd) or "
           "8*N*D*V (fwd+bwd) FLOPs / 989 TFLOP/s for the fused head, 6*N*D*V for linear_hero_loss (hero_loss's "
           "3-GEMM path; its ratio to the fused head's 8*N*D*V floor in parentheses); extra mem = the plan's memory model (bytes "
           "held beyond inputs and returned gradients) and its share of eager's lower bound N*V*(elt + 8).", "",
           C.format_table(HEAD, table_rows(rows), markdown=True), ""]
    picks = variant_lines(rows)
    if picks:
        out += ["## Designs modeled by the plans (per pass)", ""] + [f"- {x}" for x in picks] + [""]
    notes = list(dict.fromkeys(n for r in rows for n in r.get("l2_notes", [])))
    if notes:
        out += ["## L2-residency assumptions", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the rows (a JSON list) here")
    ap.add_argument("--md", default=None, help="write a markdown table here")
    ap.add_argument("--shapes", default="design", choices=("headline", "design", "bench", "all"))
    ap.add_argument("--gpu", default="h100,h200", help=f"comma list of {','.join(GPU_SPECS)}")
    ap.add_argument("--op", default=",".join(OPS), help="comma list of " + ",".join(OPS))
    ap.add_argument("--impl", default="triton,cuda")
    ap.add_argument("--pass", dest="passes", default=",".join(C.PASSES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    ap.add_argument("--kernels", action="store_true", help="print the per-kernel breakdown under each row")
    a = ap.parse_args(argv)
    csv = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    gpus, ops, impls, passes = csv(a.gpu), csv(a.op), csv(a.impl), csv(a.passes)
    for val, allowed, what in ((gpus, GPU_SPECS, "--gpu"), (ops, OPS, "--op"), (impls, ("triton", "cuda"), "--impl"),
                               (passes, C.PASSES, "--pass")):
        bad = [v for v in val if v not in allowed]
        if bad:
            print(f"error: {what} {bad[0]!r} is not one of {', '.join(allowed)}", file=sys.stderr)
            return 2
    rows = rows_for(a.shapes, gpus, ops, impls, passes, a.dtype)
    print(C.format_table(HEAD, table_rows(rows)))
    for line in variant_lines(rows):
        print(line)
    if a.kernels:
        for r in rows:
            for k in r.get("kernels", []):
                print(f"  {r['op']} {r['pass']} N={r['N']} D={r['D']} V={r['V']} {r['gpu']} {r['impl']}: "
                      f"{k['name']} grid={k['grid']} x{k['repeats']} {_ms(k['modeled_s'])} ms ({k['bound']}) "
                      f"{k['l2_note']}")
    missing = sorted({(r["op"], r["impl"], r["reason"]) for r in rows if r["status"] != "ok"})
    for op, impl, why in missing:
        print(f"{op} / {impl}: {why}", file=sys.stderr)
    if a.json:
        C.write_json(a.json, rows)
    if a.md:
        C.atomic_write(a.md, render_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
