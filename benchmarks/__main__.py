"""``python -m benchmarks``: every op x every implementation, forward and forward+backward, time and peak memory,
ratios vs each anchor and fraction of the roofline floor; writes JSON + markdown + PNG (atomically).

    python -m benchmarks                       # CPU: size ci -> benchmarks/results/ci/bench.{json,md,png}
    python -m benchmarks --size full           # GPU: -> benchmarks/results/<gpu>-<date>.{json,md,png}
    python -m benchmarks --ops entropy_logprob --impls ours,eager --out /tmp/b

Sizes: tiny (tests), ci (CPU default, < 2 min on 2 cores), full (GPU shapes of the design grid; see
``common._SHAPES``). A time budget (``--budget-s``) stops starting new measurements once spent; whatever
is left is recorded as skipped with that reason. ``run_suite`` is the in-process entry point.

Tiny and ci results are labelled smoke results. A ratio enters a headline only from >= MIN_HEADLINE_REPS timed
repeats and medians >= MIN_HEADLINE_MS on both sides (the refusal says which rule failed); every ratio
shows its min-max spread. On an H100 / H200 each ours:triton / ours:cuda time has ``modeled_ms`` (the
roofline model of its launcher's plan, ``benchmarks/roofline.py``) and ``measured/modeled`` beside it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from . import common as C
from . import impls as I
from . import roofline as R

__all__ = ["run_suite", "main"]

#: timing settings per size: warm-up calls, min/max timed repeats, seconds of repeats per measurement
_TIMING = {
    "tiny": {"warmup": 1, "min_reps": 2, "max_reps": 3, "budget_s": 0.02},
    "ci": {"warmup": 1, "min_reps": 5, "max_reps": 10, "budget_s": 0.15},
    "full": {"warmup": 2, "min_reps": 5, "max_reps": 20, "budget_s": 0.3},
}
#: Sizes whose numbers are smoke results (the harness runs), never a performance claim.
SMOKE_SIZES = ("tiny", "ci")
#: A ratio enters a headline only when both of its times come from at least this many timed repeats ...
MIN_HEADLINE_REPS = 5
#: ... and both medians are at least this long (ms): shorter calls measure launch / Python overhead.
MIN_HEADLINE_MS = {"cpu": 1.0, "cuda": 0.1}
#: default total time budget of the measurements (seconds), per size
_BUDGET = {"tiny": 120.0, "ci": 95.0, "full": 300.0}

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def _short(e: BaseException, n: int = 300) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _max_diff(out: Dict[str, torch.Tensor], ref: Optional[Dict[str, torch.Tensor]]) -> Optional[Dict[str, float]]:
    if not ref:
        return None
    d = {}
    for k, v in out.items():
        if k in ref and isinstance(v, torch.Tensor):
            d[k] = float((v.detach().float().reshape(-1) - ref[k].reshape(-1)).abs().max()) if v.numel() else 0.0
    return d or None


def _measure(impl: I.Impl, op: str, inp: I.Inputs, pass_: str, device: torch.device, meter: C.MemoryMeter,
             timing: Dict[str, Any], ref: Optional[Dict[str, torch.Tensor]]) -> Dict[str, Any]:
    """Build, warm up (timed separately: compile / JIT), time, then one call under the memory meter."""
    built = impl.build(op, inp)
    first: Dict[str, Any] = {}
    call = I.make_call(built, inp, pass_)

    t0 = time.perf_counter()
    out = call()
    C.sync(device)
    warm_s = time.perf_counter() - t0
    if pass_ == "fwd":
        first["max_abs_diff_vs_eager"] = _max_diff(out, ref)
        if impl.name == "eager":
            first["ref"] = {k: v.detach().float().clone() for k, v in out.items() if isinstance(v, torch.Tensor)}
    del out
    t = C.time_fn(call, device, warmup=max(timing["warmup"] - 1, 0), min_reps=timing["min_reps"],
                  max_reps=timing["max_reps"], budget_s=timing["budget_s"])
    for leaf in built.leaves:
        leaf.grad = None
    peak = meter.measure(call)
    for leaf in built.leaves:
        leaf.grad = None
    res = {"status": "ok", "time_ms": 1e3 * t["median_s"], "time_min_ms": 1e3 * t["min_s"],
           "time_max_ms": 1e3 * t["max_s"], "reps": t["reps"], "first_call_s": warm_s, "peak_mem_bytes": peak}
    res.update(first)
    return res


def _gmean(xs: List[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def _refusal(ro: dict, ra: dict, device: torch.device) -> Optional[str]:
    """Why a ratio of these two measurements may not enter a headline (None: it may)."""
    min_ms = MIN_HEADLINE_MS.get(device.type, MIN_HEADLINE_MS["cuda"])
    for who, r in (("ours", ro), ("anchor", ra)):
        if r.get("reps", 0) < MIN_HEADLINE_REPS:
            return f"{who}: {r.get('reps', 0)} timed repeats < {MIN_HEADLINE_REPS}"
        if r["time_ms"] < min_ms:
            return f"{who}: median {r['time_ms']:.3g} ms < {min_ms:g} ms"
    return None


def _ratios(op: str, case_label: str, per_pass: Dict[str, Dict[str, dict]], kinds: Dict[str, str],
            device: torch.device) -> List[dict]:
    """ours-vs-anchor rows: speedup = anchor median / ours median, with its spread [speedup_lo, speedup_hi]
    = [anchor min / ours max, anchor max / ours min] and ``refused`` (why it may not enter a headline)."""
    rows = []
    for pass_, per in per_pass.items():
        ok = {n: r for n, r in per.items() if r.get("status") == "ok"}
        ours = [n for n in ok if kinds.get(n) == "ours"]
        primary = next((n for n in I.OURS_PREFERENCE[device.type] if n in ours), ours[0] if ours else None)
        for o in ours:
            for a, ra in ok.items():
                if kinds.get(a) == "ours":
                    continue
                ro = ok[o]
                mo, ma = ro.get("peak_mem_bytes"), ra.get("peak_mem_bytes")
                if device.type == "cpu" and mo is not None:
                    mo = max(mo, 4096)  # the RSS meter counts whole pages: a peak under one page reads as 0
                div = lambda x, y: x / y if (x is not None and y) else None  # noqa: E731
                rows.append({"case": case_label, "pass": pass_, "ours": o, "anchor": a, "primary": o == primary,
                             "speedup": div(ra["time_ms"], ro["time_ms"]),
                             "speedup_lo": div(ra.get("time_min_ms"), ro.get("time_max_ms")),
                             "speedup_hi": div(ra.get("time_max_ms"), ro.get("time_min_ms")),
                             "refused": _refusal(ro, ra, device),
                             "mem_ratio": (ma / mo) if (mo and ma is not None and mo > 0) else None})
    return rows


def _attach_model(r: dict, op: str, impl_name: str, case: C.Case, pass_: str, dt: torch.dtype,
                  gpu: Optional[str]) -> None:
    """modeled_ms (the roofline model of the launcher's own plan) and measured/modeled for ours:triton /
    ours:cuda on an H100 / H200; nothing for other impls, ops or devices."""
    if not impl_name.startswith("ours:") or gpu is None:
        return
    kw = {"lengths": R.hero_lengths(case.N, case.N // case.B)} if op == "linear_hero_loss" else {}
    m = R.modeled_for(op, impl_name.split(":", 1)[1], pass_, case.N, case.D, case.V, dt, gpu, **kw)
    if m is None:
        return
    if m["modeled_s"] is None:
        r["modeled_reason"] = m["reason"]
        return
    r["modeled_ms"] = 1e3 * m["modeled_s"]
    r["measured_vs_modeled"] = r["time_ms"] / r["modeled_ms"] if r["modeled_ms"] > 0 else None
    r["modeled_kernels"] = [{k: x[k] for k in ("name", "modeled_s", "bound", "repeats")} for x in m["kernels"]]


def run_suite(
    size: Optional[str] = None,
    ops: Optional[List[str]] = None,
    impls: Optional[List[str]] = None,
    out_dir: Optional[str] = None,
    stem: Optional[str] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    budget_s: Optional[float] = None,
    progress: bool = True,
    threads: Optional[int] = None,
    seed: int = 0,
    write: bool = True,
    shapes: Optional[Dict[str, list]] = None,
) -> Dict[str, Any]:
    """Run the benchmark suite in-process and return the result dict (also written unless write=False).

    The returned dict has ``files`` (paths written) and the JSON layout documented in
    benchmarks/results/README.md. ``shapes`` ({op: [shape rows]}, ``common.parse_shapes``) replaces the size's
    shapes of the ops it names.
    """
    t_start = time.perf_counter()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    size = size or ("full" if dev.type == "cuda" else "ci")
    if size not in C.SIZES:
        raise ValueError(f"size must be one of {C.SIZES}, got {size!r}")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    ops = list(ops or C.OPS)
    for op in ops:
        if op not in C.OPS:
            raise ValueError(f"unknown op {op!r}; choose from {C.OPS}")
    chosen = I.get_impls(impls)
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(t_start, dev, size, dt, ops, chosen, out_dir, stem, budget_s, progress, seed, write, shapes)
    finally:
        torch.set_num_threads(prev_threads)


def _run(t_start, dev, size, dt, ops, chosen, out_dir, stem, budget_s, progress, seed, write,
         shapes=None) -> Dict[str, Any]:
    timing = _TIMING[size]
    budget = float(budget_s if budget_s is not None else _BUDGET[size])

    meter = C.MemoryMeter(dev)
    ceil = C.measure_ceilings(dev, dt, size)
    # the roofline model's GPU (h100 / h200) when this is one: measured times get their modeled twins
    gpu = R.gpu_key(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    elt = torch.empty((), dtype=dt).element_size()
    kinds = {i.name: i.kind for i in chosen}

    result: Dict[str, Any] = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "size": size,
        # ops whose shapes --shapes replaced ({op: [rows]}; the others ran the size's)
        "shapes_override": {op: [list(r) for r in rows] for op, rows in (shapes or {}).items()},
        "dtype": str(dt).replace("torch.", ""),
        "device": C.device_info(dev),
        "env": C.env_info(),
        "ceilings": ceil.as_dict(),
        "memory_method": meter.method,
        "timing": dict(timing, total_budget_s=budget),
        "smoke": size in SMOKE_SIZES,
        "headline_rule": {"min_reps": MIN_HEADLINE_REPS, "min_ms": MIN_HEADLINE_MS.get(dev.type, MIN_HEADLINE_MS["cuda"])},
        "roofline_gpu": gpu,
        "checks": "hero_kernels default input checks (labels on: one device sync per call on CUDA)",
        "ops": {},
        "skipped": [],
        "impl_notes": {},
    }

    # availability, once per (op, impl)
    avail: Dict[tuple, Optional[str]] = {}
    for op in ops:
        for impl in chosen:
            if op in impl.ops:
                try:
                    avail[(op, impl.name)] = impl.check(op, dev, dt)
                except Exception as e:  # noqa: BLE001 - a broken check is a skip reason, not a crash
                    avail[(op, impl.name)] = f"availability check failed: {_short(e)}"
    total = sum(len(C.cases_for(op, size, shapes)) * len(C.PASSES) * sum(1 for i in chosen if op in i.ops) for op in ops)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="benchmarks", unit="run", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            bar = None
    # The budget counts from the start of run_suite (availability checks, which may build the C++
    # extension, and the ceilings included); writing the files comes after it.
    end_all = t_start + budget
    result["phase_s"] = {"setup": time.perf_counter() - t_start}
    paths = _out_paths(dev, size, out_dir, stem) if write else None

    for n_op, op in enumerate(ops):
        # Each op gets an equal share of what is left of the budget (an op that finishes early leaves the
        # rest to the next), so a slow op or compile warm-up cannot starve the ops after it.
        deadline = time.perf_counter() + max(end_all - time.perf_counter(), 0.0) / (len(ops) - n_op)
        op_impls = [i for i in chosen if op in i.ops]
        # eager first (its forward outputs are the cross-check for everyone else), torch.compile last (its
        # warm-up is the slowest thing here and must not eat the op's budget before the others ran)
        op_impls.sort(key=lambda i: 0 if i.name == "eager" else (2 if i.name == "compile" else 1))
        entry: Dict[str, Any] = {"impls": {}, "cases": [], "ratios": []}
        result["ops"][op] = entry
        for impl in op_impls:
            reason = avail[(op, impl.name)]
            entry["impls"][impl.name] = {"kind": impl.kind, "status": "ok" if reason is None else "skipped",
                                         "reason": reason, "notes": impl.notes.get(op, "")}
            if impl.notes.get(op) and reason is None:
                result["impl_notes"][f"{impl.name} ({op})"] = impl.notes[op]
            if reason is not None:
                result["skipped"].append({"op": op, "impl": impl.name, "status": "skipped", "reason": reason})
        for impl in op_impls:
            if impl.detail is not None and entry["impls"][impl.name]["status"] == "ok":
                d = impl.detail(op)
                if d:
                    entry["impls"][impl.name]["detail"] = d
                    result["impl_notes"][f"{impl.name} ({op})"] = f"{impl.notes.get(op, '')} [{d}]"
        ours_ok = [n for n, d in entry["impls"].items() if d["kind"] == "ours" and d["status"] == "ok"]
        if ours_ok:
            entry["status"], entry["reason"] = "ok", None
        else:
            why = "; ".join(f"{n}: {d['reason']}" for n, d in entry["impls"].items() if d["kind"] == "ours")
            entry["status"], entry["reason"] = "skipped", f"no ours implementation available ({why})"

        for case in C.cases_for(op, size, shapes):
            runnable = [i for i in op_impls if avail[(op, i.name)] is None]
            case_entry: Dict[str, Any] = {"shape": case.as_dict(), "model": {}, "results": {p: {} for p in C.PASSES}}
            for p in C.PASSES:
                m = C.work_model(case, p, elt)
                m["floor_s"] = C.floor_seconds(m, ceil.bandwidth, ceil.matmul_flops)
                case_entry["model"][p] = m
            inp = None
            if runnable and time.perf_counter() < deadline:
                try:
                    inp = I.make_inputs(case, dev, dt, seed)
                except torch.OutOfMemoryError as e:
                    for impl in runnable:
                        for p in C.PASSES:
                            case_entry["results"][p][impl.name] = {"status": "oom", "reason": f"inputs: {_short(e)}"}
                    runnable = []
            ref = None
            for p in C.PASSES:
                for impl in op_impls:
                    if bar is not None:
                        bar.set_postfix_str(f"{op} {case.label} {p} {impl.name}", refresh=False)
                        bar.update(1)
                    if avail[(op, impl.name)] is not None:
                        continue
                    if impl not in runnable:
                        if impl.name not in case_entry["results"][p]:
                            case_entry["results"][p][impl.name] = {"status": "skipped",
                                                                   "reason": "time budget exhausted"}
                        continue
                    if time.perf_counter() > deadline:
                        case_entry["results"][p][impl.name] = {"status": "skipped", "reason": "time budget exhausted"}
                        continue
                    try:
                        r = _measure(impl, op, inp, p, dev, meter, timing, ref)
                        if "ref" in r:
                            ref = r.pop("ref")
                        fl = case_entry["model"][p]["floor_s"]
                        r["floor_frac"] = fl / (1e-3 * r["time_ms"]) if r["time_ms"] > 0 else None
                        _attach_model(r, op, impl.name, case, p, dt, gpu)
                    except torch.OutOfMemoryError as e:
                        r = {"status": "oom", "reason": _short(e, 160)}
                    except Exception as e:  # noqa: BLE001 - recorded, the suite goes on
                        r = {"status": "error", "reason": _short(e)}
                    case_entry["results"][p][impl.name] = r
                    if r["status"] != "ok":
                        result["skipped"].append({"op": op, "impl": impl.name, "status": r["status"],
                                                  "case": case.label, "pass": p, "message": r["reason"],
                                                  "reason": f"{case.label} {p}: {r['reason']}"})
                    for leaf in (inp.leaves if inp is not None else []):
                        leaf.grad = None
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            del inp, ref
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            entry["ratios"].extend(_ratios(op, case.label, case_entry["results"], kinds, dev))
            entry["cases"].append(case_entry)
            if paths:  # after every case: a run killed past its budget (the GPU suite's stage timeout) keeps them
                C.write_json(paths["json"], dict(result, partial=True, wall_s=time.perf_counter() - t_start))
    if bar is not None:
        bar.close()
    result["phase_s"]["measure"] = time.perf_counter() - t_start - result["phase_s"]["setup"]

    summary = []
    for op, entry in result["ops"].items():
        groups: Dict[tuple, List[dict]] = {}
        for r in entry["ratios"]:
            if r["primary"]:
                groups.setdefault((r["pass"], r["ours"], r["anchor"]), []).append(r)
        for (p, o, a), rs in groups.items():
            # only ratios that passed the headline rule enter the geometric means; the rest are counted
            good = [r for r in rs if not r.get("refused")]
            refused = [r["refused"] for r in rs if r.get("refused")]
            summary.append({"op": op, "pass": p, "ours": o, "anchor": a, "n": len(good), "n_refused": len(refused),
                            "refused": refused[0] if refused and not good else None,
                            "speedup_gmean": _gmean([r["speedup"] for r in good]),
                            "speedup_min": min((r["speedup_lo"] for r in good if r["speedup_lo"]), default=None),
                            "speedup_max": max((r["speedup_hi"] for r in good if r["speedup_hi"]), default=None),
                            "mem_ratio_gmean": _gmean([r["mem_ratio"] for r in rs])})
    result["summary"] = summary
    result["wall_s"] = time.perf_counter() - t_start

    if paths:
        try:
            C.plot_results(result, paths["png"])
        except Exception as e:  # noqa: BLE001 - a plotting failure must not lose the numbers
            result["plot_error"] = _short(e)
            paths.pop("png")
        result["files"] = paths
        result["wall_s"] = time.perf_counter() - t_start
        C.write_json(paths["json"], result)
        C.atomic_write(paths["md"], C.render_markdown(result))
    return result


def _out_paths(dev: torch.device, size: str, out_dir: Optional[str], stem: Optional[str]) -> Dict[str, str]:
    """{json, md, png}: the result files (default folder and stem from ``common.default_out``), folder created."""
    d0, s0 = C.default_out(dev, size)
    os.makedirs(out_dir or d0, exist_ok=True)
    return {k: os.path.join(out_dir or d0, f"{stem or s0}.{k}") for k in ("json", "md", "png")}


def print_report(result: Dict[str, Any], log: Callable[[str], None] = print) -> None:
    c = result["ceilings"]
    log(f"device: {result['device']['name']} ({result['size']}, {result['dtype']}); "
        f"copy {c['bandwidth_GBps']:.1f} GB/s, matmul {c['matmul_TFLOPs']:.3f} TFLOP/s ({c['matmul_dtype']})")
    log(C.format_table(C.TIMES_HEAD, C.result_rows(result)))
    summ = result.get("summary", [])
    if summ:
        log("")
        log(C.headline_title(result) + " (speedup = anchor time / ours time [min-max over repeats], "
            "memory ratio = anchor peak / ours peak):")
        log(C.format_table(C.HEADLINE_HEAD, C.headline_rows(summ)))
    groups = C.group_skipped(result.get("skipped", []))
    if groups:
        log("")
        log("skipped / failed:")
    for g in groups:
        tag = "" if g["status"] == "skipped" else f"{g['status'].upper()} "
        where = "" if g["where"] == "all" else f" [{g['where']}]"
        log(f"  {tag}{g['op']} / {g['impl']}{where}: {g['reason']}")
    if result.get("files"):
        log("")
        log("wrote " + ", ".join(result["files"].values()) + f" ({result['wall_s']:.1f} s)")


def _csv(s: Optional[str]) -> Optional[List[str]]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=C.SIZES, default=None, help="ci (CPU default) | full (GPU default) | tiny")
    ap.add_argument("--ops", default=None, help=f"comma list of {','.join(C.OPS)} (default: all)")
    ap.add_argument("--impls", default=None,
                    help=f"comma list of ours,{','.join(I.impl_names())} (default: all; 'ours' = every backend)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/ci on CPU, "
                                                "benchmarks/results on GPU)")
    ap.add_argument("--stem", default=None, help="output file stem (default bench on CPU, <gpu>-<date> on GPU)")
    ap.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting measurements after this many seconds (default: tiny 120, ci 95, full 300, counted from the start; shared equally by the ops)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--shapes", default=None,
                    help="replace the size's shapes of some ops: 'OP=SHAPE[,SHAPE];OP=...', e.g. "
                         "'grad_sketch=512x32000,2048x32000;linear_grad_sketch=128x128x8192' (rows: "
                         + ", ".join(f"{o} {d}" for o, d in C.SHAPE_DIMS.items()) + ")")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shapes = C.parse_shapes(args.shapes) if args.shapes else None
        result = run_suite(size=args.size, ops=_csv(args.ops), impls=_csv(args.impls), out_dir=args.out,
                           stem=args.stem, device=args.device, dtype=args.dtype, budget_s=args.budget_s,
                           progress=not args.no_progress, threads=args.threads, seed=args.seed, shapes=shapes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
