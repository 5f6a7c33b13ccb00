"""``python -m benchmarks.compile_report``: registers, shared memory and spills of every GPU kernel build, for
sm_80 and sm_90a, compiled WITHOUT a GPU (hero_kernels/gpu_compile.py).

Sources:
* every module ``hero_kernels/backends/triton/*.py`` exposing ``KERNEL_CONFIGS``, a list of
  ``(kernel fn, signature dict, constexprs dict, num_warps, num_stages, description)``; a module may also
  expose ``compile_attrs(fn, signature) -> attrs`` (ASTSource attributes such as tt.divisibility, so the
  compiled code is the one the launcher runs);
* every ``csrc/*.cu`` (nvcc ``-cubin`` per target; every kernel in it).

A build "spills" when it uses local memory: cuobjdump's LOCAL > 0 or a STACK frame > 0 (register spills
of Triton kernels show up as STACK with LOCAL = 0). Prints a table, writes JSON + markdown (atomically),
and exits 1 when any build spills, 2 when a build failed to compile (and none spilled), 3 when there was
nothing to compile, 0 otherwise.

    python -m benchmarks.compile_report                      # all, both targets
    python -m benchmarks.compile_report --jobs 8 --out DIR   # parallel (one process per job)
    python -m benchmarks.compile_report --match fwd --cc 90 --skip-cu
"""
from __future__ import annotations

# Triton kernels can only be compiled when @triton.jit made real JIT functions: the interpreter mode
# (TRITON_INTERPRET=1, used by the CPU tests) must be off before triton is first imported.
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1" and __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import glob  # noqa: E402
import importlib  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

from . import common as C  # noqa: E402

__all__ = ["discover_triton", "cu_files", "run_report", "main"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_PKG = "hero_kernels.backends.triton"


def discover_triton() -> Tuple[List[Tuple[str, int, str]], List[dict]]:
    """(jobs, notes): one job (module, index, description) per KERNEL_CONFIGS entry; notes for modules
    without KERNEL_CONFIGS or failing to import."""
    pkg = importlib.import_module(TRITON_PKG)
    jobs, notes = [], []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        name = f"{TRITON_PKG}.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - recorded as a failed build source
            notes.append({"module": name, "status": "error", "reason": f"import failed: {type(e).__name__}: {e}"})
            continue
        configs = getattr(mod, "KERNEL_CONFIGS", None)
        if configs is None:
            notes.append({"module": name, "status": "skipped", "reason": "no KERNEL_CONFIGS"})
            continue
        for i, entry in enumerate(configs):
            jobs.append((name, i, str(entry[5]) if len(entry) > 5 else f"{name}[{i}]"))
    return jobs, notes


def cu_files() -> List[str]:
    return sorted(glob.glob(os.path.join(REPO, "csrc", "*.cu")))


def _row(kind: str, source: str, config: str, arch: str, usage: Optional[dict] = None, error: Optional[str] = None):
    r = {"kind": kind, "source": source, "config": config, "arch": arch, "kernel": None, "registers": None,
         "shared_bytes": None, "local_bytes": None, "stack_bytes": None, "spills": False, "error": error}
    if usage:
        r.update({k: usage[k] for k in ("kernel", "registers", "shared_bytes", "local_bytes", "stack_bytes")})
        r["spills"] = bool(usage["local_bytes"] or usage["stack_bytes"])
    return r


def _triton_usage(mod, fn, sig, const, cc, nw, ns, desc) -> dict:
    from hero_kernels import gpu_compile

    if type(fn).__name__ == "InterpretedFunction":
        raise RuntimeError("kernel was decorated under TRITON_INTERPRET=1; run the report in a fresh process "
                           "without that variable")
    # Modules that keep their arguments 16-byte aligned say so (compile_attrs), so the report shows the
    # specialization that actually runs.
    attrs = mod.compile_attrs(fn, sig) if hasattr(mod, "compile_attrs") else None
    return gpu_compile.triton_resource_usage(fn, sig, const, cc, nw, ns, config=desc, attrs=attrs).as_dict()


def _triton_job(job: Tuple[str, int, str, int]) -> dict:
    name, idx, desc, cc = job
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(name)
        fn, sig, const, nw, ns, desc = mod.KERNEL_CONFIGS[idx][:6]
        r = _row("triton", name, desc, arch, usage=_triton_usage(mod, fn, sig, const, cc, nw, ns, desc))
    except Exception as e:  # noqa: BLE001 - a failed build is a row of the report
        r = _row("triton", name, desc, arch, error=f"{type(e).__name__}: {str(e).strip()[-600:]}")
    r["seconds"] = time.perf_counter() - t0
    return r


def _demangle(names: List[str]) -> List[str]:
    """'entropy_logprob_fwd_kernel<__half, 512>' from the mangled name (c++filt / cu++filt when present)."""
    import shutil
    import subprocess

    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    try:
        r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30, check=True)
        out = r.stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return names
    if len(out) != len(names):
        return names
    short = []
    for d in out:
        d = d.replace("(anonymous namespace)::", "")
        if d.startswith("void "):
            d = d[5:]
        depth, cut = 0, len(d)
        for i, ch in enumerate(d):  # drop the parameter list: the first '(' outside template brackets
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        short.append(d[:cut])
    return short


def _cu_job(job: Tuple[str, int]) -> List[dict]:
    path, cc = job
    from hero_kernels import gpu_compile

    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    src = os.path.relpath(path, REPO)
    t0 = time.perf_counter()
    try:
        usages = gpu_compile.nvcc_resource_usage(path, cc)
        names = _demangle([u.kernel for u in usages])
        rows = [_row("cuda", src, nm, arch, usage=u.as_dict()) for nm, u in zip(names, usages)]
        if not rows:
            rows = [_row("cuda", src, "", arch, error="no kernel in the cubin")]
    except Exception as e:  # noqa: BLE001
        err = getattr(e, "stderr", None) or str(e)
        rows = [_row("cuda", src, "", arch, error=f"{type(e).__name__}: {str(err).strip()[-600:]}")]
    for r in rows:
        r["seconds"] = (time.perf_counter() - t0) / len(rows)
    return rows


def run_report(ccs: Sequence[int] = (80, 90), match: Optional[str] = None, skip_cu: bool = False,
               skip_triton: bool = False, jobs: int = 1, verbose: bool = False) -> Dict[str, Any]:
    t0 = time.perf_counter()
    notes: List[dict] = []
    tjobs: List[tuple] = []
    if not skip_triton:
        try:
            found, notes = discover_triton()
        except Exception as e:  # noqa: BLE001 - e.g. triton missing
            found, notes = [], [{"module": TRITON_PKG, "status": "error", "reason": f"{type(e).__name__}: {e}"}]
        tjobs = [(n, i, d, cc) for (n, i, d) in found if not match or match in d for cc in ccs]
    cjobs = [] if skip_cu else [(p, cc) for p in cu_files() for cc in ccs]
    rows: List[dict] = []
    total = len(tjobs) + len(cjobs)

    def progress(new: List[dict]) -> None:  # one stderr line per finished build: a cut-short run still tells
        rows.extend(new)
        if verbose:
            for r in new:
                st = "SPILL" if r["spills"] else ("ERROR" if r["error"] else "ok")
                print(f"[{len(rows)}/{total}+] {r['arch']} {r['config'] or r['source']}: regs={r['registers']} "
                      f"local={r['local_bytes']} stack={r['stack_bytes']} {st}", file=sys.stderr, flush=True)

    if jobs > 1 and total > 1:
        import multiprocessing as mp

        # spawn: fresh interpreters (no inherited TRITON_INTERPRET-decorated kernels, no forked threads)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs_c = [ex.submit(_cu_job, j) for j in cjobs]
            for r in ex.map(_triton_job, tjobs):
                progress([r])
            for f in futs_c:
                progress(f.result())
    else:
        for j in tjobs:
            progress([_triton_job(j)])
        for j in cjobs:
            progress(_cu_job(j))
    n_spills = sum(r["spills"] for r in rows)
    n_errors = sum(r["error"] is not None for r in rows)
    if n_spills:
        code = 1
    elif n_errors:
        code = 2
    elif not rows:
        code = 3
    else:
        code = 0
    from hero_kernels import gpu_compile

    return {"schema": 1, "targets": [("sm_90a" if c == 90 else f"sm_{c}") for c in ccs], "rows": rows,
            "notes": notes, "n_kernels": len(rows), "n_spills": n_spills, "n_errors": n_errors,
            "exit_code": code, "ok": code == 0, "wall_s": time.perf_counter() - t0,
            "tools": {"cuobjdump": gpu_compile.cuobjdump_path(), "nvcc": gpu_compile.nvcc_path()},
            "spill_rule": "local_bytes > 0 or stack_bytes > 0"}


def _table_rows(rep: Dict[str, Any]) -> List[list]:
    out = []
    for r in rep["rows"]:
        status = "SPILL" if r["spills"] else ("ERROR" if r["error"] else "ok")
        out.append([r["kind"], r["config"] or r["source"], r["arch"], C._fmt(r["registers"], "d"),
                    C._fmt(r["shared_bytes"], "d"), C._fmt(r["local_bytes"], "d"), C._fmt(r["stack_bytes"], "d"),
                    status])
    return out


_HEAD = ["kind", "kernel / config", "arch", "regs", "shared B", "local B", "stack B", "status"]


def render_markdown(rep: Dict[str, Any]) -> str:
    out = ["# GPU compile report (no GPU needed)", "",
           f"Targets {', '.join(rep['targets'])}; {rep['n_kernels']} builds, {rep['n_spills']} with local memory "
           f"(spill rule: {rep['spill_rule']}), {rep['n_errors']} failed; {rep['wall_s']:.1f} s.", "",
           C.format_table(_HEAD, _table_rows(rep), markdown=True), ""]
    errs = [r for r in rep["rows"] if r["error"]]
    if errs:
        out += ["## Errors", ""] + [f"- `{r['config'] or r['source']}` {r['arch']}: {r['error']}" for r in errs] + [""]
    if rep["notes"]:
        out += ["## Modules", ""] + [f"- `{n['module']}`: {n['status']}: {n['reason']}" for n in rep["notes"]] + [""]
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", default="80,90", help="compute capabilities, comma list (default 80,90 = sm_80, sm_90a)")
    ap.add_argument("--match", default=None, help="only Triton configs whose description contains this")
    ap.add_argument("--skip-cu", action="store_true", help="leave out csrc/*.cu")
    ap.add_argument("--skip-triton", action="store_true", help="leave out the Triton kernels")
    ap.add_argument("--jobs", type=int, default=None,
                    help="parallel compile processes (default: 1 on <= 4 cores, else half the cores, at most 8)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "ci"), help="output folder")
    ap.add_argument("--stem", default="compile_report", help="output file stem (.json, .md)")
    ap.add_argument("--quiet", action="store_true", help="no per-build progress lines on stderr")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    jobs = args.jobs or (1 if cores <= 4 else min(8, cores // 2))
    ccs = [int(c) for c in args.cc.split(",") if c.strip()]
    rep = run_report(ccs, args.match, args.skip_cu, args.skip_triton, jobs, verbose=not args.quiet)
    print(C.format_table(_HEAD, _table_rows(rep)))
    for r in rep["rows"]:
        if r["error"]:
            print(f"ERROR {r['config'] or r['source']} {r['arch']}: {r['error'][:300]}", file=sys.stderr)
    for n in rep["notes"]:
        print(f"note: {n['module']}: {n['status']}: {n['reason']}")
    os.makedirs(args.out, exist_ok=True)
    jp, mp_ = os.path.join(args.out, f"{args.stem}.json"), os.path.join(args.out, f"{args.stem}.md")
    C.write_json(jp, rep)
    C.atomic_write(mp_, render_markdown(rep))
    print(f"{rep['n_kernels']} builds, {rep['n_spills']} spilling, {rep['n_errors']} failed "
          f"({rep['wall_s']:.1f} s); wrote {jp}, {mp_}")
    return rep["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
