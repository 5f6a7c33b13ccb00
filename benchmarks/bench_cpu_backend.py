"""CPU fused C++ backend vs eager PyTorch: entropy + log-prob forward + backward, N=4096, V=32000, fp32.

Targets: the fused backend is at least 2x faster than eager and uses at most a quarter of eager's peak
extra memory.

Variants (same inputs: logits [N, V] fp32, labels [N], random upstream grads g = dL/dlogp, k = dL/dH):
  eager    log_softmax, p = exp, H = -(p * logp).sum, gather, autograd backward (logits.grad)
  fused    hero_kernels.backends.cpu forward (logp, H, lse), then backward into a fresh dlogits [N, V]
  fused-inplace  the same, with dlogits written over the logits (what an autograd op may do when the
           logits are not needed afterwards); reported, not used for the targets

Time: median of ``reps`` timed runs after one warm-up run, torch's intra-op thread count (all cores;
the C++ backend parallelizes rows with at::parallel_for on the same OpenMP pool).

Peak extra memory: each variant runs in a FRESH subprocess, and the child measures the peak of everything
the variant allocates beyond its inputs (outputs and gradients included). Setup first: import torch,
build/load the extension, fill the inputs in place (no temporary raises the high-water mark early) and
run the variant once on a tiny input (libraries, thread pools). Then:
  * primary: Linux VmHWM, reset right before the run by writing 5 to /proc/self/clear_refs;
    peak = VmHWM after - VmRSS before (exact to a page);
  * fallback where /proc is missing: ru_maxrss after - ru_maxrss before. Linux carries ru_maxrss across
    fork + execve, so a child of a big parent (e.g. pytest after the eager benchmark) starts with the
    parent's high-water mark; the fallback is only trusted when its base is close to the child's own
    RSS, otherwise memory is reported unmeasured (never a silent 0).
torch's CPU allocator returns large blocks to the OS, so nothing is hidden in an allocator cache.

Run:  python -m benchmarks.bench_cpu_backend [--N 4096 --V 32000 --reps 3]
      pytest benchmarks/bench_cpu_backend.py -s      (pytest-benchmark timings + the ratio checks)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict

import torch

N_DEFAULT, V_DEFAULT = 4096, 32000
VARIANTS = ("eager", "fused", "fused-inplace")
SPEEDUP_TARGET = 2.0
MEMORY_TARGET = 0.25
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# the variants
# ------------------------------------------------------------------------------------------------
def make_inputs(N: int, V: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    # filled in place: a temporary here would raise ru_maxrss before the base reading and hide the peak
    logits = torch.empty(N, V).normal_(0.0, 3.0, generator=gen)
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::17] = -100  # some masked rows, as in real batches
    g = torch.randn(N, generator=gen)
    k = torch.randn(N, generator=gen)
    return logits, labels, g, k


def run_eager(logits, labels, g, k):
    x = logits.detach().requires_grad_(True)
    logq = torch.log_softmax(x, dim=-1)
    p = logq.exp()
    H = -(p * logq).sum(-1)
    valid = labels != -100
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logq.gather(-1, safe[:, None]).squeeze(-1)
    zero = torch.zeros((), dtype=logp.dtype)
    logp, H = torch.where(valid, logp, zero), torch.where(valid, H, zero)
    (logp * g + H * k).sum().backward()
    return x.grad


def run_fused(logits, labels, g, k, inplace: bool = False):
    from hero_kernels.backends import UpstreamGrads
    from hero_kernels.backends.cpu import entropy_logprob as cpu_el
    from hero_kernels.options import RowOptions

    opts = RowOptions()
    saved = cpu_el.forward(logits, labels, opts)
    return cpu_el.backward(logits, labels, saved, UpstreamGrads(g, k), opts, out=logits if inplace else None)


def variant_fn(name: str):
    if name == "eager":
        return run_eager
    if name == "fused":
        return run_fused
    if name == "fused-inplace":
        return lambda *a: run_fused(*a, inplace=True)
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


# ------------------------------------------------------------------------------------------------
# child process: one variant, memory then time
# ------------------------------------------------------------------------------------------------
def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _hwm_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm(field: str):
    """A /proc/self/status size in bytes, or None where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(name: str, N: int, V: int, reps: int) -> Dict:
    from hero_kernels import _cpp_build

    _cpp_build.load()
    fn = variant_fn(name)
    small = make_inputs(64, 1000, seed=1)
    fn(*small)  # load kernels, start the OpenMP pool, fault in library pages
    del small
    logits, labels, g, k = make_inputs(N, V)
    work = logits.clone() if name == "fused-inplace" else logits
    rss_before = _vm("VmRSS")
    base = _maxrss_bytes()
    # An inherited high-water mark would hide the peak; without /proc the base cannot be checked.
    maxrss_valid = rss_before is None or base <= rss_before + (64 << 20)
    hwm_ok = rss_before is not None and _hwm_reset()
    out = fn(work, labels, g, k)
    maxrss_peak = (_maxrss_bytes() - base) if maxrss_valid else None
    hwm_peak = (_vm("VmHWM") - rss_before) if hwm_ok else None
    peak = hwm_peak if hwm_peak is not None else maxrss_peak
    del out
    times = []
    for _ in range(reps):
        w = logits.clone() if name == "fused-inplace" else logits  # clone outside the timed region
        t0 = time.perf_counter()
        o = fn(w, labels, g, k)
        times.append(time.perf_counter() - t0)
        del o, w
    return {
        "variant": name,
        "N": N,
        "V": V,
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_extra_bytes": peak,
        "peak_method": "VmHWM delta" if hwm_peak is not None else ("ru_maxrss delta" if peak is not None else None),
        "hwm_extra_bytes": hwm_peak,
        "maxrss_extra_bytes": maxrss_peak,
        "inputs_bytes": logits.numel() * logits.element_size(),
    }


def measure(name: str, N: int = N_DEFAULT, V: int = V_DEFAULT, reps: int = 3, timeout: float = 1200) -> Dict:
    """Run one variant in a fresh interpreter and return its JSON record."""
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu_backend", "--child", name, "--N", str(N), "--V", str(V),
           "--reps", str(reps)]
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child {name!r} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(N: int = N_DEFAULT, V: int = V_DEFAULT, reps: int = 3) -> Dict:
    res = {v: measure(v, N, V, reps) for v in VARIANTS}
    e, f, fi = res["eager"], res["fused"], res["fused-inplace"]
    mb = 2.0**20
    measured = all(res[v]["peak_extra_bytes"] is not None for v in VARIANTS)

    def mem_ratio(v):
        return res[v]["peak_extra_bytes"] / max(e["peak_extra_bytes"], 1) if measured else None

    summary = {
        "speedup": e["median_s"] / f["median_s"],
        "speedup_inplace": e["median_s"] / fi["median_s"],
        "memory_ratio": mem_ratio("fused"),
        "memory_ratio_inplace": mem_ratio("fused-inplace"),
        "memory_method": e["peak_method"],
    }

    def mib(x):
        return "unmeasured" if x is None else f"{x / mb:8.1f} MiB"

    lines = [f"CPU fused backend vs eager, N={N} V={V} fp32, {e['threads']} threads, median of {reps}:"]
    for v in VARIANTS:
        r = res[v]
        lines.append(
            f"  {v:14s} {r['median_s'] * 1e3:9.1f} ms   peak extra {mib(r['peak_extra_bytes'])} "
            f"[{r['peak_method']}; ru_maxrss cross-check {mib(r['maxrss_extra_bytes'])}]"
        )
    lines.append(
        f"  speedup {summary['speedup']:.2f}x (target >= {SPEEDUP_TARGET}x), in-place {summary['speedup_inplace']:.2f}x"
    )
    if measured:
        lines.append(
            f"  memory ratio {summary['memory_ratio']:.3f} (target <= {MEMORY_TARGET}), "
            f"in-place {summary['memory_ratio_inplace']:.3f}"
        )
    else:
        lines.append("  memory ratio: UNMEASURED (no /proc VmHWM and ru_maxrss inherited from the parent)")
    print("\n".join(lines))
    return {"results": res, "summary": summary}


# ------------------------------------------------------------------------------------------------
# pytest-benchmark entry points
# ------------------------------------------------------------------------------------------------
def _bench(benchmark, name):
    import pytest

    try:
        from hero_kernels import _cpp_build

        _cpp_build.load()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    logits, labels, g, k = make_inputs(N_DEFAULT, V_DEFAULT)
    fn = variant_fn(name)
    benchmark.extra_info.update({"N": N_DEFAULT, "V": V_DEFAULT, "dtype": "float32", "threads": torch.get_num_threads()})
    benchmark.pedantic(fn, args=(logits, labels, g, k), rounds=3, iterations=1, warmup_rounds=1)


def test_bench_eager(benchmark):
    _bench(benchmark, "eager")


def test_bench_fused(benchmark):
    _bench(benchmark, "fused")


def test_targets_speed_and_memory():
    """>= 2x faster and <= 1/4 of eager's peak extra memory (fresh subprocess per variant)."""
    out = compare()
    s = out["summary"]
    assert s["speedup"] >= SPEEDUP_TARGET, f"speedup {s['speedup']:.2f}x < {SPEEDUP_TARGET}x"
    assert s["memory_ratio"] is not None, "peak memory could not be measured on this platform"
    assert s["memory_ratio"] <= MEMORY_TARGET, f"memory ratio {s['memory_ratio']:.3f} > {MEMORY_TARGET}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=N_DEFAULT)
    ap.add_argument("--V", type=int, default=V_DEFAULT)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the full record to this file")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.N, args.V, args.reps)))
        return 0
    out = compare(args.N, args.V, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    s = out["summary"]
    ok = s["speedup"] >= SPEEDUP_TARGET and s["memory_ratio"] is not None and s["memory_ratio"] <= MEMORY_TARGET
    print("targets met" if ok else "TARGETS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
