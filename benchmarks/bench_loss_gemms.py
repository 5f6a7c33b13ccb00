"""The HERO loss from hidden states + LM head: 4-GEMM op path vs 3-GEMM loss path vs Liger's fused GRPO loss.

Run: ``python -m benchmarks.bench_loss_gemms [--batch 2 --T 4096 --D 256 --V 128256 --repeats 3 --json out.json]``

Variants (fp32 CPU; hidden [B, T, D] and W [V, D] both require grad; forward + ``loss.backward()``)
------------------------------------------------------------------------------------------------
* ``hero-4gemm``: ``hero_kernels.hero_loss(hidden, labels, A, weight=W)`` on the generic fused op
  ``linear_entropy_logprob``: forward GEMM, then a backward that recomputes every logits chunk (4 GEMMs).
* ``hero-3gemm``: the same call on its default path (``hero_kernels.linear_hero_loss``): each chunk's
  gradients are computed in the forward (logits, dh, dW: 3 GEMMs); the backward only scales them.
* ``liger``: ``liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss`` as TRL's ``use_liger_kernel=True`` builds
  it (loss_type "dapo", beta 0, no reference model, ``compiled`` as TRL: True), without entropy weighting
  (Liger has none): the loss a TRL+Liger user runs instead.
Both HERO variants use HERO's defaults: entropy weighting on (kappa 1), loss_agg "seq-mean-token-mean".
Inputs: B responses of T tokens, the last T/8 of each masked (padding after an early eos, as in
``bench_trainer_memory``), one random advantage per response, old log-probs = current (ratio 1).

Method: each variant runs in a FRESH subprocess (allocator state and peaks never leak between variants). The
child runs one untimed call on T/8-token responses (libraries, thread pools, Liger's torch.compile), builds
the inputs, then ``--repeats`` calls, each measured by ``benchmarks.common.MemoryMeter`` (CPU: ``malloc_trim(0)``, reset
of the peak resident set, VmHWM after - VmRSS before: the call's peak above the inputs) and timed with
``perf_counter`` around the same call. The gradients it creates (dh, dW) count; they are dropped between
repeats. min / median / max over the repeats are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

VARIANTS = ("hero-3gemm", "liger", "hero-4gemm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(B: int, T: int, D: int, V: int, seed: int = 0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, D, generator=gen)).requires_grad_()
    W = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=gen)
    y[:, T - T // 8:] = -100
    A = torch.randn(B, generator=gen)
    return h, W, y, A


def _step(variant: str, h, W, y, A, liger_mod=None) -> float:
    """One forward + backward; returns the loss. Gradients land in h.grad / W.grad."""
    import torch

    import hero_kernels as hk
    from hero_kernels import linear_hero_loss

    if variant == "liger":
        mask = (y != -100).to(torch.int64)
        out = liger_mod(h, W, y.clamp_min(0), mask, A)
        loss = out[0] if isinstance(out, tuple) else out
    else:
        linear_hero_loss.ENABLED = variant == "hero-3gemm"
        loss, _ = hk.hero_loss(h, y, A, weight=W, impl="cpu")
    loss.backward()
    return float(loss.detach())


def _child(variant: str, B: int, T: int, D: int, V: int, repeats: int, liger_compiled: bool) -> Dict:
    import torch

    from benchmarks.common import MemoryMeter

    meter = MemoryMeter(torch.device("cpu"))
    liger_mod = None
    if variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger_mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                             compiled=liger_compiled, max_completion_length=T)
    # warm-up on T/8-token responses (libraries, thread pools, Liger's torch.compile), not counted
    _step(variant, *_inputs(B, max(T // 8, 8), D, V, seed=1), liger_mod)
    h, W, y, A = _inputs(B, T, D, V)
    times: List[float] = []
    peaks: List[Optional[int]] = []
    loss = None
    for _ in range(repeats):
        h.grad = W.grad = None

        def call():
            nonlocal loss
            t0 = time.perf_counter()
            loss = _step(variant, h, W, y, A, liger_mod)
            times.append(time.perf_counter() - t0)

        peaks.append(meter.measure(call))
    stats = lambda xs: {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}  # noqa: E731
    return {"variant": variant, "loss": loss, "seconds": stats(times), "times": times,
            "peak_extra_bytes": stats(peaks) if None not in peaks else None, "peaks": peaks,
            "method": meter.method, "threads": torch.get_num_threads()}


def measure(B: int, T: int, D: int, V: int, repeats: int = 3, variants=VARIANTS, liger_compiled: bool = True,
            timeout: float = 7200) -> Dict:
    """Each variant in a fresh subprocess; returns {"args": ..., variant: result dict}."""
    out: Dict = {"args": dict(B=B, T=T, N=B * T, D=D, V=V, repeats=repeats, dtype="float32", device="cpu",
                              liger_compiled=liger_compiled)}
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.bench_loss_gemms", "--child", v, "--batch", str(B), "--T", str(T),
               "--D", str(D), "--V", str(V), "--repeats", str(repeats)]
        if not liger_compiled:
            cmd.append("--liger-eager")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
        if r.returncode != 0:
            out[v] = {"variant": v, "status": f"failed (rc={r.returncode}): {r.stderr.strip()[-1500:]}"}
            continue
        out[v] = json.loads(r.stdout.strip().splitlines()[-1])
        out[v]["status"] = "ok"
    return out


def _table(res: Dict) -> str:
    a = res["args"]
    lines = [f"HERO loss from hidden states, fwd+bwd, fp32 CPU: B={a['B']} x T={a['T']} (N={a['N']}, last T/8 masked), "
             f"D={a['D']}, V={a['V']}, {a['repeats']} repeats",
             f"{'variant':<12}{'time s min/med/max':>26}{'peak extra MiB min/med/max':>34}{'loss':>12}"]
    for v in VARIANTS:
        r = res.get(v)
        if r is None:
            continue
        if r.get("status") != "ok":
            lines.append(f"{v:<12}  {r.get('status')}")
            continue
        s, p = r["seconds"], r["peak_extra_bytes"]
        ts = f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"
        ps = "unmeasured" if p is None else f"{p['min'] / 2**20:.0f} / {p['median'] / 2**20:.0f} / {p['max'] / 2**20:.0f}"
        lines.append(f"{v:<12}{ts:>26}{ps:>34}{r['loss']:>12.5f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2, help="responses B (G completions of one prompt)")
    p.add_argument("--T", type=int, default=4096, help="tokens per response (N = B*T rows)")
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--liger-eager", action="store_true", help="Liger with compiled=False (TRL uses compiled=True)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.batch, a.T, a.D, a.V, a.repeats, not a.liger_eager)))
        return 0
    variants = [v for v in a.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {VARIANTS}")
    res = measure(a.batch, a.T, a.D, a.V, a.repeats, variants, not a.liger_eager)
    print(_table(res))
    if a.json:
        from benchmarks.common import atomic_write

        atomic_write(a.json, json.dumps(res, indent=2))
    return 0 if all(res[v].get("status") == "ok" for v in variants) else 1


if __name__ == "__main__":
    sys.exit(main())
