"""``python -m benchmarks.kernel_timings``: where the time of each GPU pass goes, measured next to the model.

For both core ops at the roofline's headline shapes (fused head N=16384, D=4096, V=128256; logits op
N=16384, V=151936; bf16) and each GPU backend (triton, cuda):

* CUDA-event time (median of ``--reps`` after one warm-up) of the forward (no grad) and of the backward
  alone (forward outside the timing), peak extra memory of forward+backward;
* per kernel: device time from ``torch.profiler`` of one forward and one backward, beside the roofline
  model's time for the plan entry of the same name (``benchmarks/roofline.py``; summed over launches);
* ``linear_hero_loss`` (each impl's row kernels): ``hero_loss`` on hidden states + LM head, the training path
  that makes the gradients in its forward (3 GEMMs per chunk, ``hero_kernels.linear_hero_loss``), in responses of
  ``HERO_T`` tokens (the roofline's "closed" rows); its "fwd" is that forward WITH grad (all the GEMMs),
  its "bwd" the hand-over of the stored gradients; modeled against ``linear_hero_loss.plan``;
* beside them, cuBLAS GEMMs of the fused head's shapes (``torch.mm``): logits ``[N, D] x [D, V]``, dh
  ``[N, V] x [V, D]``, dW ``[V, N] x [N, D]`` (2*N*D*V FLOPs each), the rate our GEMM-bound pieces compare to.

Needs CUDA; writes ``--json``; exits 0 unless nothing could be timed. ``--small`` shrinks the shapes (tests).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

import hero_kernels as hk

from . import common as C
from . import roofline as RL

__all__ = ["profile_kernels", "gemm_timings", "time_op", "main", "HERO_T"]

#: tokens per response of the linear_hero_loss timing (the roofline's "closed" response length)
HERO_T = RL.HERO_RESPONSES["closed"]


def _events(fn: Callable[[], Any], reps: int) -> Dict[str, float]:
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    return {"ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "reps": reps}


def profile_kernels(fn: Callable[[], Any], setup: Optional[Callable[[], Any]] = None) -> List[dict]:
    """[{name, ms, count}] of the GPU kernels one call of ``fn`` launches (self device time), largest first;
    ``setup`` runs before, outside the profile."""
    from torch.profiler import ProfilerActivity, profile

    if setup is not None:
        setup()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and t > 0:
            out.append({"name": e.key, "ms": t / 1e3, "count": e.count})
    return sorted(out, key=lambda r: -r["ms"])


def _match(measured: List[dict], model: Optional[dict]) -> List[dict]:
    """One row per plan entry name (modeled time summed over its launches) with the measured kernels whose
    name contains it. Library calls (``external`` entries: cuBLAS, torch ops) cannot be told apart by
    kernel name, so they are compared as one bucket, "external (...)", against every measured kernel no
    plan name claimed; with no external entry those kernels are listed as unmatched."""
    if not model or not model.get("kernels"):
        return [dict(m, modeled_ms=None) for m in measured]
    rows, used = [], set()
    plan: Dict[str, dict] = {}
    for k in model["kernels"]:
        p = plan.setdefault(k["name"], {"name": k["name"], "modeled_ms": 0.0, "external": k["external"]})
        p["modeled_ms"] += 1e3 * k["modeled_s"]
    for name, p in plan.items():
        if p["external"]:
            continue
        hit = [i for i, m in enumerate(measured) if name.strip("_") in m["name"]]
        used.update(hit)
        p["ms"] = sum(measured[i]["ms"] for i in hit) if hit else None
        rows.append(p)
    rest = [m for i, m in enumerate(measured) if i not in used]
    ext = [p for p in plan.values() if p["external"]]
    if ext:
        rows.append({"name": "external (" + ", ".join(p["name"] for p in ext) + ")", "external": True,
                     "modeled_ms": sum(p["modeled_ms"] for p in ext), "ms": sum(m["ms"] for m in rest) or None,
                     "measured_names": [m["name"][:80] for m in rest]})
    else:
        rows += [dict(m, modeled_ms=None, unmatched=True) for m in rest]
    for r in rows:
        r["measured_vs_modeled"] = r["ms"] / r["modeled_ms"] if r.get("ms") and r.get("modeled_ms") else None
    return rows


def gemm_timings(N: int, D: int, V: int, dtype: torch.dtype, reps: int) -> List[dict]:
    dev = torch.device("cuda")
    h = torch.randn(N, D, device=dev, dtype=dtype)
    w = torch.randn(V, D, device=dev, dtype=dtype)
    dz = torch.randn(N, V, device=dev, dtype=dtype)
    out = []
    for name, fn in (("cublas logits h @ W^T", lambda: h @ w.t()), ("cublas dh dz @ W", lambda: dz @ w),
                     ("cublas dW dz^T @ h", lambda: dz.t() @ h)):
        t = _events(fn, reps)
        t.update(name=name, tflops=2 * N * D * V / (t["ms"] * 1e-3) / 1e12)
        out.append(t)
    del h, w, dz
    torch.cuda.empty_cache()
    return out


def time_op(op: str, impl: str, N: int, D: int, V: int, dtype: torch.dtype, reps: int,
            gpu: Optional[str], device: str = "cuda") -> dict:
    """Times, per-kernel profile and model of one (op, impl) at (N, D, V) on ``device`` (CUDA; the tests run it
    on CPU with the torch.cuda calls faked, so the code the suite's timings stage runs is exercised there)."""
    dev = torch.device(device)
    y = torch.randint(0, V, (N,), device=dev)
    g, k = torch.randn(N, device=dev), torch.randn(N, device=dev)
    plan_kw: Dict[str, Any] = {}
    if op == "linear_hero_loss":  # the loss makes the gradients in its forward: time that forward with grad
        from hero_kernels import linear_hero_loss as LHL

        x = (torch.randn(N // HERO_T, HERO_T, D, device=dev) / 4).to(dtype).requires_grad_(True)
        w = (torch.randn(V, D, device=dev) / D ** 0.5).to(dtype).requires_grad_(True)
        A = torch.randn(N // HERO_T, device=dev)
        if not LHL.applies(x, w, None, impl, False):
            raise RuntimeError(f"hero_loss would not take the 3-GEMM path with impl={impl!r}")
        fwd = lambda: hk.hero_loss(x, y.view(N // HERO_T, HERO_T), A, weight=w, impl=impl)[0]  # noqa: E731
        leaves, plan_kw = [x, w], {"lengths": RL.hero_lengths(N, HERO_T)}
    elif op == "linear_entropy_logprob":
        x = (torch.randn(N, D, device=dev) / 4).to(dtype).requires_grad_(True)
        w = (torch.randn(V, D, device=dev) / D ** 0.5).to(dtype).requires_grad_(True)
        fwd = lambda: hk.linear_entropy_logprob(x, w, y, impl=impl)  # noqa: E731
        leaves = [x, w]
    else:
        x = (torch.randn(N, V, device=dev) * 3).to(dtype).requires_grad_(True)
        fwd = lambda: hk.entropy_logprob(x, y, impl=impl)  # noqa: E731
        leaves = [x]

    def no_grad():
        if op == "linear_hero_loss":
            fwd()  # with grad: this forward IS the work
            return
        with torch.no_grad():
            fwd()

    state: Dict[str, Any] = {}

    def bwd():  # the forward outside: backward alone
        out = state.pop("out")
        loss = out if op == "linear_hero_loss" else (out[0] * g + out[1] * k).sum()
        loss.backward()
        for t in leaves:
            t.grad = None

    def do_fwd():
        state["out"] = fwd()

    res: Dict[str, Any] = {"op": op, "impl": impl, "N": N, "D": D, "V": V, "dtype": str(dtype).replace("torch.", "")}
    res["fwd"] = _events(no_grad, reps)
    # backward alone: a forward before each timed backward, outside the events
    ts = []
    for i in range(reps + 1):
        do_fwd()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        bwd()
        e1.record()
        e1.synchronize()
        if i:
            ts.append(e0.elapsed_time(e1))
    res["bwd"] = {"ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts), "reps": reps}
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    do_fwd()
    bwd()
    torch.cuda.synchronize()
    res["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    res["fwd"]["kernels"] = profile_kernels(no_grad)
    res["bwd"]["kernels"] = profile_kernels(bwd, setup=do_fwd)
    model = RL.modeled_for(op, impl, "fwd", N, D, V, dtype, gpu, **plan_kw)
    if model and model["modeled_s"] is not None:
        res["fwd"]["modeled_ms"] = 1e3 * model["modeled_s"]
        res["fwd"]["by_plan_kernel"] = _match(res["fwd"]["kernels"], model)
    full = RL.modeled_for(op, impl, "fwd+bwd", N, D, V, dtype, gpu, **plan_kw)
    if full and full["modeled_s"] is not None:
        res["fwd+bwd_modeled_ms"] = 1e3 * full["modeled_s"]
        res["fwd+bwd_ms"] = res["fwd"]["ms"] + res["bwd"]["ms"]
        res["by_plan_kernel"] = _match(res["fwd"]["kernels"] + res["bwd"]["kernels"], full)
    elif full:
        res["model_reason"] = full["reason"]
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_timings", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impls", default="triton,cuda")
    ap.add_argument("--no-hero", action="store_true", help="skip the linear_hero_loss (3-GEMM) timings")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="N=1024, D=512, V=32000 (a quick check of the script)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_timings needs CUDA", file=sys.stderr)
        return 2
    gpu = RL.gpu_key(torch.cuda.get_device_name())
    N, D = (1024, 512) if a.small else (16384, 4096)
    shapes = {"linear_entropy_logprob": (N, D, 32000 if a.small else 128256),
              "entropy_logprob": (N, 0, 32000 if a.small else 151936)}
    dt = torch.bfloat16
    out: Dict[str, Any] = {"device": torch.cuda.get_device_name(), "roofline_gpu": gpu, "ops": [], "gemms": []}
    t0 = time.perf_counter()
    out["gemms"] = gemm_timings(*shapes["linear_entropy_logprob"], dt, a.reps)
    for g in out["gemms"]:
        print(f"{g['name']}: {g['ms']:.3f} ms ({g['tflops']:.0f} TFLOP/s)", flush=True)
    impls = [impl for impl in a.impls.split(",") if impl]
    runs = [(op, nd, impl) for op, nd in shapes.items() for impl in impls]
    if not a.no_hero:  # the training path at the fused head's shape, with each impl's row kernels
        runs += [("linear_hero_loss", shapes["linear_entropy_logprob"], impl) for impl in impls]
    for op, (n, d, v), impl in runs:
        try:
            r = time_op(op, impl, n, d, v, dt, a.reps, gpu)
        except Exception as e:  # noqa: BLE001 - recorded, the next one runs
            r = {"op": op, "impl": impl, "error": f"{type(e).__name__}: {e}"[:400]}
        torch.cuda.empty_cache()
        out["ops"].append(r)
        if a.json:  # after every op: a stage that runs out of time still leaves what it measured
            C.write_json(a.json, dict(out, wall_s=time.perf_counter() - t0))
        if "error" in r:
            print(f"{op}/{impl}: ERROR {r['error']}", flush=True)
            continue
        print(f"{op}/{impl} N={n} D={d} V={v}: fwd {r['fwd']['ms']:.3f} ms, bwd {r['bwd']['ms']:.3f} ms, "
              f"modeled fwd+bwd {C._fmt(r.get('fwd+bwd_modeled_ms'), '.3f')} ms, peak "
              f"{r['peak_extra_bytes'] / 2**20:.0f} MiB", flush=True)
        for k in r.get("by_plan_kernel") or r["fwd"]["kernels"] + r["bwd"]["kernels"]:
            print(f"    {k['name'][:70]:70s} {C._fmt(k.get('ms'), '.3f'):>9} ms  modeled "
                  f"{C._fmt(k.get('modeled_ms'), '.3f'):>9} ms", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    if a.json:
        C.write_json(a.json, out)
    return 0 if any("error" not in r for r in out["ops"]) else 1


if __name__ == "__main__":
    sys.exit(main())
