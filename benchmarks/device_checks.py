"""``python -m benchmarks.device_checks``: correctness of both ops on the device, first stage of the GPU suite.

Every GPU backend (``triton``, ``cuda``) of ``entropy_logprob`` and ``linear_entropy_logprob`` against the
float64 reference (``hero_kernels.reference``) at the awkward cases: a real vocabulary (V = 151936), odd V,
a strided ``[B, T, V]`` view that does not flatten (``logits[:, :-1]``), the in-place backward, a bias,
masked rows (``ignore_index``), temperature != 1, random upstream gradients. A result passes when its max
error is <= 2x the error of the same-dtype PyTorch computation (+ a tiny absolute floor), per output.
Prints one line per check, writes ``--json`` (list of rows), exits 1 on any failure. ~1 minute on an H100
(most of it Triton's first compile). ``--device cpu`` with ``--impls torch`` exercises the script itself.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

import hero_kernels as hk
from hero_kernels import reference as R

from . import common as C

__all__ = ["logits_cases", "linear_cases", "run_checks", "main"]

_DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _err(a: Optional[torch.Tensor], ref: torch.Tensor) -> float:
    if a is None:
        return float("inf")
    return float((a.double() - ref).abs().max()) if ref.numel() else 0.0


def _verdict(name: str, ours: Dict[str, torch.Tensor], base: Dict[str, torch.Tensor],
             ref: Dict[str, torch.Tensor]) -> dict:
    """ours passes an output when err(ours) <= 2 * err(same-dtype torch) + 1e-6 * max|ref| + 1e-7."""
    out = {"check": name, "ok": True, "errors": {}}
    for k, r in ref.items():
        e, b = _err(ours.get(k), r), _err(base[k], r)
        tol = 2 * b + 1e-6 * float(r.abs().max() if r.numel() else 0) + 1e-7
        out["errors"][k] = {"ours": e, "torch_same_dtype": b, "tol": tol}
        if not e <= tol:  # NaN fails too
            out["ok"] = False
    return out


def _labels(N: int, V: int, dev, masked: float = 0.1) -> torch.Tensor:
    y = torch.randint(0, V, (N,), device=dev)
    y[torch.rand(N, device=dev) < masked] = -100
    return y


def logits_cases(full: bool) -> List[dict]:
    """(name, N, V, dtype, temperature, view, inplace); view 'shift' = logits[:, :-1] of [B, T+1, V]."""
    V = 151936 if full else 1999
    return [dict(name=f"V={V} bf16 tau=0.7 masked", N=96, V=V, dt="bf16", tau=0.7, view=None, inplace=False),
            dict(name="odd V=32003 fp16", N=64, V=32003, dt="fp16", tau=1.0, view=None, inplace=False),
            dict(name="odd V=4099 fp32", N=33, V=4099, dt="fp32", tau=1.3, view=None, inplace=False),
            dict(name="strided [B,T,V][:, :-1] V=4099 bf16", N=3 * 17, V=4099, dt="bf16", tau=1.0, view="shift",
                 inplace=False),
            dict(name="in-place backward V=32000 bf16", N=64, V=32000, dt="bf16", tau=0.9, view=None, inplace=True)]


def linear_cases(full: bool) -> List[dict]:
    V = 151936 if full else 1999
    return [dict(name=f"V={V} D=512 bf16 tau=0.8 masked", N=128, D=512, V=V, dt="bf16", tau=0.8, bias=False),
            dict(name="odd V=32003 D=200 bf16 bias", N=77, D=200, V=32003, dt="bf16", tau=1.0, bias=True),
            dict(name="odd V=4099 D=96 fp32 bias tau=1.5", N=50, D=96, V=4099, dt="fp32", tau=1.5, bias=True)]


def _check_logits(impl: str, c: dict, dev) -> dict:
    dt, N, V, tau = _DT[c["dt"]], c["N"], c["V"], c["tau"]
    if c["view"] == "shift":
        B = 3
        xfull = (torch.randn(B, N // B + 1, V, device=dev) * 4).to(dt)
        x = xfull[:, :-1]
        y = _labels(N, V, dev).reshape(B, N // B)
    else:
        x = (torch.randn(N, V, device=dev) * 4).to(dt)
        y = _labels(N, V, dev)
    g, k = torch.randn(y.shape, device=dev), torch.randn(y.shape, device=dev)
    rl, rH, _ = R.entropy_logprob(x, y, tau)
    rdz = R.entropy_logprob_backward(x, y, g, k, tau)
    bl, bH, _ = R.entropy_logprob(x, y, tau, dtype=torch.float32)  # eager PyTorch in fp32 math
    bdz = R.entropy_logprob_backward(x, y, g, k, tau, dtype=torch.float32).to(dt)  # ... stored in the input dtype
    if c["inplace"]:  # in-place backward needs a non-leaf: the gradient reaches the leaf through "* 1"
        src = x.detach().clone().requires_grad_(True)
        xin, grad_of = src * 1, lambda: src.grad
    elif c["view"] == "shift":  # the op sees the strided view itself, not a contiguous copy
        base_t = xfull.clone().requires_grad_(True)
        xin, grad_of = base_t[:, :-1], lambda: base_t.grad[:, :-1]
        assert not xin.is_contiguous()
    else:
        leaf = x.detach().clone().requires_grad_(True)
        xin, grad_of = leaf, lambda: leaf.grad
    logp, H = hk.entropy_logprob(xin, y, tau, impl=impl, inplace_backward=c["inplace"])
    (logp * g + H * k).sum().backward()
    dz = grad_of()
    return _verdict(f"entropy_logprob/{impl} {c['name']}", {"logp": logp, "H": H, "dlogits": dz},
                    {"logp": bl, "H": bH, "dlogits": bdz}, {"logp": rl, "H": rH, "dlogits": rdz})


def _check_linear(impl: str, c: dict, dev) -> dict:
    dt, N, D, V, tau = _DT[c["dt"]], c["N"], c["D"], c["V"], c["tau"]
    h = (torch.randn(N, D, device=dev)).to(dt)
    w = (torch.randn(V, D, device=dev) / D ** 0.5 * 3).to(dt)
    b = (torch.randn(V, device=dev)).to(dt) if c["bias"] else None
    y = _labels(N, V, dev)
    g, k = torch.randn(N, device=dev), torch.randn(N, device=dev)
    ref, base = {}, {}
    ref["logp"], ref["H"], _ = R.linear_entropy_logprob(h, w, y, b, tau)
    ref["dh"], ref["dW"], ref["db"] = R.linear_entropy_logprob_backward(h, w, y, g, k, b, tau)
    # same-dtype PyTorch: logits from a GEMM in the input dtype, softmax math in fp32, grads stored in dtype
    z = R.linear_logits(h, w, b, dt)
    base["logp"], base["H"], _ = R.entropy_logprob(z, y, tau, dtype=torch.float32)
    dz = R.entropy_logprob_backward(z, y, g, k, tau, dtype=torch.float32).to(dt)
    base["dh"], base["dW"], base["db"] = dz @ w, dz.t() @ h, (None if b is None else dz.float().sum(0).to(dt))
    if b is None:
        ref.pop("db"), base.pop("db")
    hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    bb = None if b is None else b.clone().requires_grad_(True)
    logp, H = hk.linear_entropy_logprob(hh, ww, y, bb, tau, impl=impl)
    (logp * g + H * k).sum().backward()
    ours = {"logp": logp, "H": H, "dh": hh.grad, "dW": ww.grad, "db": None if bb is None else bb.grad}
    return _verdict(f"linear_entropy_logprob/{impl} {c['name']}", ours, base, ref)


def run_checks(device: str, impls: Sequence[str], full: bool, log: Callable[[str], None] = print,
               json_path: Optional[str] = None) -> List[dict]:
    """Every check of ``impls``; ``json_path``: the rows so far are written there after every check, so a run
    cut short by the suite's stage timeout (first Triton / nvcc builds on the device) keeps what it checked."""
    dev = torch.device(device)
    torch.manual_seed(0)
    rows = []
    for impl in impls:
        for fn, cases in ((_check_logits, logits_cases(full)), (_check_linear, linear_cases(full))):
            for c in cases:
                t0 = time.perf_counter()
                try:
                    r = fn(impl, c, dev)
                except Exception as e:  # noqa: BLE001 - a crash is a failed check, the others still run
                    op = "entropy_logprob" if fn is _check_logits else "linear_entropy_logprob"
                    r = {"check": f"{op}/{impl} {c['name']}", "ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
                r["seconds"] = time.perf_counter() - t0
                rows.append(r)
                errs = ", ".join(f"{k} {v['ours']:.2e}/{v['tol']:.2e}" for k, v in r.get("errors", {}).items())
                if json_path:
                    C.write_json(json_path, rows)
                log(f"{'ok  ' if r['ok'] else 'FAIL'} {r['check']} ({r['seconds']:.1f} s) "
                    f"{errs or r.get('error', '')}")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.device_checks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--impls", default="triton,cuda")
    ap.add_argument("--small", action="store_true", help="V=1999 instead of 151936 in the first cases")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = run_checks(a.device, [x for x in a.impls.split(",") if x], full=not a.small, json_path=a.json)
    if a.json:
        C.write_json(a.json, rows)  # also when no check ran
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} device checks passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
