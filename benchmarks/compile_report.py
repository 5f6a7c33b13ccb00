"""``python -m benchmarks.compile_report``: registers, shared memory and spills of every GPU kernel build, for
sm_80 and sm_90a, compiled WITHOUT a GPU (hero_kernels/gpu_compile.py).

Sources:
* every module ``hero_kernels/backends/triton/*.py`` exposing ``KERNEL_CONFIGS``, a list of
  ``(kernel fn, signature dict, constexprs dict, num_warps, num_stages, description)``; a module may also
  expose ``compile_attrs(fn, signature) -> attrs`` (ASTSource attributes such as tt.divisibility, so the
  compiled code is the one the launcher runs);
* every ``csrc/*.cu`` (nvcc ``-cubin`` per target; every kernel in it).

Every Triton config is built as the launcher runs it: "aligned" with the module's ``compile_attrs(fn,
signature)`` (the 16-byte divisibility its launcher guarantees; without it: pointers and every specializable
integer divisible by 16, as Triton specializes V % 16 == 0), and again "unaligned" (pointers only: odd V;
or ``compile_attrs(..., aligned=False)`` when it takes that keyword) unless the module sets
``ALIGNED_ONLY = True`` (its launchers pad every argument, as the fused LM head's do). Per build the report adds, from the SASS (cuobjdump in the triton
wheel): CTAs per SM (registers, shared memory, warps against the SM's limits), the hot loop (the innermost
loop with the most bytes loaded per iteration): its SASS instructions, elements per thread per iteration
(bytes of its LDG/LDGSTS over the element size of the first pointer argument / template type) and
instructions per element, and on sm_90a whether the kernel uses wgmma (HGMMA in SASS).

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
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

from hero_kernels.backends.plan import GPU_SPECS as _GPU_SPECS  # noqa: E402

from . import common as C  # noqa: E402

__all__ = ["discover_triton", "cu_files", "run_report", "main"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_PKG = "hero_kernels.backends.triton"


def discover_triton() -> Tuple[List[Tuple[str, int, str, Optional[tuple]]], List[dict]]:
    """(jobs, notes): one job (module, index, description, archs) per KERNEL_CONFIGS entry (archs: the
    entry's optional 7th field, the compute capabilities it is built for; None = all); notes for modules
    without KERNEL_CONFIGS or failing to import. A list re-exported by a second module counts once. A package
    without KERNEL_CONFIGS (code split over submodules, e.g. ``linear/``) is no note when every ``*KERNEL_CONFIGS``
    list of its submodules is built through an entry module; one that is not gets a note."""
    pkg = importlib.import_module(TRITON_PKG)
    jobs, notes, seen, packages = [], [], set(), []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        name = f"{TRITON_PKG}.{info.name}"
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - recorded as a failed build source
            notes.append({"module": name, "status": "error", "reason": f"import failed: {type(e).__name__}: {e}"})
            continue
        configs = getattr(mod, "KERNEL_CONFIGS", None)
        if configs is None and info.ispkg:
            packages.append(mod)
            continue
        if configs is None or id(configs) in seen:
            why = "no KERNEL_CONFIGS" if configs is None else "KERNEL_CONFIGS of another module (built there)"
            notes.append({"module": name, "status": "skipped", "reason": why})
            continue
        seen.add(id(configs))
        for i, entry in enumerate(configs):
            jobs.append((name, i, str(entry[5]) if len(entry) > 5 else f"{name}[{i}]",
                         tuple(entry[6]) if len(entry) > 6 else None))
    for mod in packages:  # after every entry module: only lists no entry module exposes are notes
        notes += _unexposed_configs(mod, seen)
    return jobs, notes


def _unexposed_configs(package, seen: set) -> List[dict]:
    """Notes for the ``*KERNEL_CONFIGS`` lists of ``package``'s submodules that no entry module exposes (their
    ids are not in ``seen``): kernels the report would otherwise silently leave out."""
    out = []
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            sub = importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001
            out.append({"module": info.name, "status": "error", "reason": f"import failed: {type(e).__name__}: {e}"})
            continue
        for attr, val in vars(sub).items():
            if attr.endswith("KERNEL_CONFIGS") and isinstance(val, list) and id(val) not in seen:
                seen.add(id(val))
                out.append({"module": f"{info.name}.{attr}", "status": "skipped",
                            "reason": f"no module of {TRITON_PKG} exposes it as KERNEL_CONFIGS (not built)"})
    return out


def _specializable_ints(fn, signature: Dict[str, str]) -> List[str]:
    skip = set()
    # a JITFunction has do_not_specialize; under TRITON_INTERPRET=1 it sits in the decorator's kwargs
    dns = getattr(fn, "do_not_specialize", None) or (getattr(fn, "kwargs", None) or {}).get("do_not_specialize")
    for x in dns or ():
        skip.add(fn.arg_names[x] if isinstance(x, int) else x)
    return [n for n in fn.arg_names if signature.get(n) in ("i32", "i64") and n not in skip]


def build_variants(mod, fn, signature: Dict[str, str]) -> Dict[str, Optional[Dict[tuple, list]]]:
    """{variant: ASTSource attrs}: "aligned" (the module's ``compile_attrs``, else pointers and every
    specializable integer divisible by 16) and, unless the module sets ``ALIGNED_ONLY = True`` (its launchers
    pad every argument to 16), "unaligned" (``compile_attrs(..., aligned=False)`` when it takes that
    keyword, else pointers only: odd V)."""
    ptrs = [n for n in fn.arg_names if signature.get(n, "").startswith("*")]
    idx = {n: i for i, n in enumerate(fn.arg_names)}
    div = [["tt.divisibility", 16]]
    unaligned = {(idx[n],): div for n in ptrs}
    ca = getattr(mod, "compile_attrs", None)
    if ca is None:
        out = {"aligned": {(idx[n],): div for n in ptrs + _specializable_ints(fn, signature)}, "unaligned": unaligned}
        return {k: v for k, v in out.items() if k == "aligned" or not getattr(mod, "ALIGNED_ONLY", False)}
    import inspect

    try:
        takes_aligned = "aligned" in inspect.signature(ca).parameters
    except (TypeError, ValueError):
        takes_aligned = False
    if takes_aligned:
        out = {"aligned": ca(fn, signature, aligned=True), "unaligned": ca(fn, signature, aligned=False)}
    else:
        out = {"aligned": ca(fn, signature), "unaligned": unaligned}
    # the flag sits with the module or with the module that defines its compile_attrs
    if getattr(mod, "ALIGNED_ONLY", False) or getattr(sys.modules.get(ca.__module__), "ALIGNED_ONLY", False):
        out.pop("unaligned")
    return out


def cu_files() -> List[str]:
    return sorted(glob.glob(os.path.join(REPO, "csrc", "*.cu")))


#: per-SM limits: registers, shared memory (bytes, incl. the 1 KB the driver reserves per CTA), CTAs, warps
SM_LIMITS = {"sm_90a": {"regs": 65536, "smem": 228 * 1024, "ctas": 32, "warps": 64},
             "sm_80": {"regs": 65536, "smem": 164 * 1024, "ctas": 32, "warps": 64}}
#: thread-instructions an H100 SXM issues per second (SMs x 4 schedulers x 32 lanes x sustained clock): the
#: roofline model's constant (hero_kernels.backends.plan.GpuSpec), stated once there
H100_ISSUE_PER_S = _GPU_SPECS["h100"].thread_instr_per_s
_ELT = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8, "__nv_bfloat16": 2, "__half": 2, "float": 4, "double": 8}


def ctas_per_sm(arch: str, registers: int, shared_bytes: int, warps: int) -> Tuple[Optional[int], str]:
    """(resident CTAs per SM, the limiting resource). Registers are allocated per warp in units of 256."""
    lim = SM_LIMITS.get(arch)
    if lim is None or not warps or registers is None:
        return None, "unknown"
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    caps = {"registers": (lim["regs"] // per_warp) // warps, "warps": lim["warps"] // warps, "ctas": lim["ctas"],
            "shared": lim["smem"] // ((shared_bytes or 0) + 1024)}
    limiter = min(caps, key=lambda k: caps[k])
    return caps[limiter], limiter


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_functions(sass: str) -> Dict[str, List[Tuple[int, str]]]:
    """{kernel: [(address, instruction text)]} from ``cuobjdump -sass``."""
    out: Dict[str, List[Tuple[int, str]]] = {}
    cur = None
    for line in sass.splitlines():
        if "Function : " in line:
            cur = out.setdefault(line.split("Function : ", 1)[1].strip(), [])
        elif cur is not None:
            m = _INSTR.search(line)
            if m:
                cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def _load_bytes(ins: str) -> int:
    """Bytes per thread of a global load (LDG / LDGSTS), 0 for anything else."""
    op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
    if not (op.startswith("LDG.") or op == "LDG" or op.startswith("LDGSTS")):
        return 0
    sfx = op.split(".")[1:]
    for key, n in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if key in sfx:
            return n
    return 4


_BRA = re.compile(r"\bBRA(?:\.\w+)*\s+(?:!?U?P\w*,\s*)?(0x[0-9a-f]+)")


def _shortest_path(body: List[Tuple[int, str]], min_exp: int = 0) -> int:
    """Instructions on the shortest path from a loop's head to its back-edge branch that issues at least
    ``min_exp`` MUFU.EX2 (body: the loop's instructions in address order, NOPs removed). A loop whose body
    branches around a rare case (a CUDA chunk that raises the running max, a -inf / NaN fixup) executes
    only its common path per iteration; the static body would count every branch's instructions as if
    each ran. The exp floor (one per element in every row kernel) keeps a shortcut that skips the math
    (an all -inf chunk) from passing for the common path. Straight-line loops: the body."""
    index = {a: i for i, (a, _) in enumerate(body)}
    succ: List[List[int]] = []
    for i, (_, ins) in enumerate(body):
        m = _BRA.search(ins)
        nxt = [] if ins.split()[0] == "EXIT" else [i + 1]
        if m:
            # Unconditional (no guard, no predicate operand): only the target; else both edges.
            uncond = not ins.startswith("@") and not re.search(r"\bBRA(?:\.\w+)*\s+!?U?P", ins) \
                and ".DIV" not in ins.split()[0]
            tgt = index.get(int(m.group(1), 16))
            nxt = ([] if uncond else nxt) + ([tgt] if tgt is not None else [])
        succ.append([j for j in nxt if j < len(body)])
    ex2 = [int("MUFU.EX2" in ins) for _, ins in body]
    # BFS over (instruction, exps issued so far capped at min_exp): every instruction weighs 1.
    start = (0, min(ex2[0], min_exp))
    dist = {start: 1}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for i, k in frontier:
            for j in succ[i]:
                st = (j, min(k + ex2[j], min_exp))
                if st not in dist:
                    dist[st] = dist[(i, k)] + 1
                    nxt_frontier.append(st)
        frontier = nxt_frontier
    return dist.get((len(body) - 1, min_exp), len(body))


def hot_loop(instrs: List[Tuple[int, str]], elt: Optional[int]) -> Optional[dict]:
    """The innermost loop (a backward branch) with the most bytes loaded per thread per iteration (on a tie,
    the one with fewer instructions: a row's masked tail loop runs at most once per row, its steady-state
    loop ~V / BLOCK_V times): its SASS instruction count, the instructions on its common path (see
    ``_shortest_path``), elements per thread per iteration (bytes / elt) and instructions per element
    (common path)."""
    addr = [a for a, _ in instrs]
    loops = []
    for a, ins in instrs:
        m = _BRA.search(ins)
        if m and int(m.group(1), 16) < a:
            lo = int(m.group(1), 16)
            body = [x for x in instrs if lo <= x[0] <= a and not x[1].startswith("NOP")]
            loops.append((lo, a, body))
    inner = [lp for lp in loops if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] and
                                           sum(_load_bytes(i) for _, i in o[2]) for o in loops)]
    cand = [(sum(_load_bytes(i) for _, i in b), -len(b), lo, hi, b) for lo, hi, b in inner]
    cand = [c for c in cand if c[0] > 0]
    if not cand or not addr:
        return None
    nbytes, neg_n, lo, hi, body = max(cand, key=lambda c: c[:4])
    n_exp = sum("MUFU.EX2" in i for _, i in body)
    path = _shortest_path(body, min(n_exp, nbytes // elt) if elt else 0)
    r = {"instructions": -neg_n, "path_instructions": path, "load_bytes_per_thread": nbytes,
         "loops_with_loads": len(cand), "span": f"{lo:#x}-{hi:#x}"}
    if elt:
        r["elements_per_thread"] = nbytes / elt
        r["instr_per_element"] = path * elt / nbytes
        r["h100_issue_bound_TBps"] = H100_ISSUE_PER_S / r["instr_per_element"] * elt / 1e12
    return r


def sass_summary(instrs: List[Tuple[int, str]], arch: str, elt: Optional[int]) -> dict:
    ops = [i.split()[1] if i.startswith("@") else i.split()[0] for _, i in instrs]
    out = {"sass_instructions": len(instrs), "hot_loop": hot_loop(instrs, elt),
           "mma": sum(o.startswith(("HMMA", "HGMMA")) for o in ops)}
    out["wgmma"] = any(o.startswith("HGMMA") for o in ops) if arch == "sm_90a" else None
    return out


def _in_flight(r: dict) -> None:
    """Bytes one SM's resident CTAs load per hot-loop iteration (a row kernel wants ~16-24 KB in flight)."""
    hl = r.get("hot_loop")
    if hl and r.get("ctas_per_sm") and r.get("warps"):
        hl["bytes_per_sm_per_iter"] = r["ctas_per_sm"] * r["warps"] * 32 * hl["load_bytes_per_thread"]


def _row(kind: str, source: str, config: str, arch: str, usage: Optional[dict] = None, error: Optional[str] = None):
    r = {"kind": kind, "source": source, "config": config, "arch": arch, "kernel": None, "registers": None,
         "shared_bytes": None, "local_bytes": None, "stack_bytes": None, "spills": False, "error": error,
         "variant": "", "warps": None, "ctas_per_sm": None, "occupancy_limit": None, "hot_loop": None,
         "wgmma": None, "mma": None}
    if usage:
        r.update({k: usage[k] for k in ("kernel", "registers", "shared_bytes", "local_bytes", "stack_bytes")})
        r["spills"] = bool(usage["local_bytes"] or usage["stack_bytes"])
    return r


def _triton_job(job: Tuple[str, int, str, str, int]) -> dict:
    name, idx, desc, variant, cc = job
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    t0 = time.perf_counter()
    try:
        from hero_kernels import gpu_compile

        mod = importlib.import_module(name)
        fn, sig, const, nw, ns, desc = mod.KERNEL_CONFIGS[idx][:6]
        if type(fn).__name__ == "InterpretedFunction":
            raise RuntimeError("kernel was decorated under TRITON_INTERPRET=1; run the report in a fresh process "
                               "without that variable")
        compiled = gpu_compile.triton_compile(fn, sig, const, cc, nw, ns, build_variants(mod, fn, sig)[variant])
        cubin = compiled.asm["cubin"]
        usage = gpu_compile._parse_cuobjdump(gpu_compile._dump_cubin(cubin), arch)[0].as_dict()
        # Triton's dynamic shared memory is in the metadata, not in the cubin's static SHARED figure
        usage["shared_bytes"] = max(usage["shared_bytes"], int(getattr(compiled.metadata, "shared", 0)))
        r = _row("triton", name, desc, arch, usage=usage)
        first_ptr = next((t for t in sig.values() if t.startswith("*")), "*")
        funcs = sass_functions(gpu_compile.cubin_sass(cubin))
        r.update(sass_summary(next(iter(funcs.values()), []), arch, _ELT.get(first_ptr[1:])))
        r["warps"] = nw
        r["ctas_per_sm"], r["occupancy_limit"] = ctas_per_sm(arch, r["registers"], r["shared_bytes"], nw)
        _in_flight(r)
    except Exception as e:  # noqa: BLE001 - a failed build is a row of the report
        r = _row("triton", name, desc, arch, error=f"{type(e).__name__}: {str(e).strip()[-600:]}")
    r["variant"] = variant
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


def _template_elt(demangled: str) -> Optional[int]:
    """Element size of the first template argument: 'k<__nv_bfloat16, 512>' -> 2."""
    m = re.search(r"<\s*([\w:]+)", demangled)
    return _ELT.get(m.group(1).split("::")[-1]) if m else None


def _cu_job(job: Tuple[str, int]) -> List[dict]:
    path, cc = job
    from hero_kernels import gpu_compile

    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    src = os.path.relpath(path, REPO)
    t0 = time.perf_counter()
    try:
        cubin = gpu_compile.nvcc_cubin(path, cc)
        usages = gpu_compile._parse_cuobjdump(gpu_compile._dump_cubin(cubin), arch)
        funcs = sass_functions(gpu_compile.cubin_sass(cubin))
        threads = gpu_compile.cubin_max_threads(cubin)
        names = _demangle([u.kernel for u in usages])
        rows = []
        for nm, u in zip(names, usages):
            r = _row("cuda", src, nm, arch, usage=u.as_dict())
            r.update(sass_summary(funcs.get(u.kernel, []), arch, _template_elt(nm)))
            if u.kernel in threads:  # block size from __launch_bounds__; unknown otherwise
                r["warps"] = -(-threads[u.kernel] // 32)
                r["ctas_per_sm"], r["occupancy_limit"] = ctas_per_sm(arch, u.registers, u.shared_bytes, r["warps"])
                _in_flight(r)
            rows.append(r)
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
        tjobs = [(n, i, d, "aligned", cc) for (n, i, d, archs) in found if not match or match in d for cc in ccs
                 if archs is None or cc in archs]
    cjobs = [] if skip_cu else [(p, cc) for p in cu_files() for cc in ccs]
    rows: List[dict] = []
    total = len(tjobs) + len(cjobs)

    def progress(new: List[dict]) -> None:  # one stderr line per finished build: a cut-short run still tells
        rows.extend(new)
        if verbose:
            for r in new:
                st = "SPILL" if r["spills"] else ("ERROR" if r["error"] else "ok")
                print(f"[{len(rows)}/{total}+] {r['arch']} {r['config'] or r['source']} {r['variant']}: "
                      f"regs={r['registers']} "
                      f"local={r['local_bytes']} stack={r['stack_bytes']} {st}", file=sys.stderr, flush=True)

    def unaligned_jobs() -> List[tuple]:  # phase 2: the unaligned builds of modules that have them
        out = []
        for j, r in zip(tjobs, rows[:len(tjobs)]):
            try:
                mod = importlib.import_module(j[0])
                if "unaligned" in build_variants(mod, *mod.KERNEL_CONFIGS[j[1]][:2]):
                    out.append(j[:3] + ("unaligned",) + j[4:])
            except Exception:  # noqa: BLE001 - the aligned build's row already carries the error
                pass
        return out

    if jobs > 1 and total > 1:
        import multiprocessing as mp

        # spawn: fresh interpreters (no inherited TRITON_INTERPRET-decorated kernels, no forked threads)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
            futs_c = [ex.submit(_cu_job, j) for j in cjobs]
            for r in ex.map(_triton_job, tjobs):
                progress([r])
            for r in ex.map(_triton_job, unaligned_jobs()):
                progress([r])
            for f in futs_c:
                progress(f.result())
    else:
        for j in tjobs:
            progress([_triton_job(j)])
        for j in unaligned_jobs():
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
        hl = r.get("hot_loop") or {}
        ctas = "-" if r.get("ctas_per_sm") is None else f"{r['ctas_per_sm']} ({r['occupancy_limit']})"
        wg = {True: "yes", False: "no", None: "-"}[r.get("wgmma")]
        out.append([r["kind"], r["config"] or r["source"], r.get("variant") or "-", r["arch"],
                    C._fmt(r["registers"], "d"), C._fmt(r["shared_bytes"], "d"), C._fmt(r["local_bytes"], "d"),
                    C._fmt(r["stack_bytes"], "d"), ctas, C._fmt(hl.get("instructions"), "d"),
                    C._fmt(hl.get("elements_per_thread"), "g"), C._fmt(hl.get("instr_per_element"), ".1f"),
                    C._fmt(None if hl.get("bytes_per_sm_per_iter") is None else hl["bytes_per_sm_per_iter"] / 1024,
                           ".0f"), wg,
                    status])
    return out


_HEAD = ["kind", "kernel / config", "build", "arch", "regs", "shared B", "local B", "stack B", "CTAs/SM (limit)",
         "loop SASS", "elts/thread/iter", "SASS/elt", "KB/SM/iter", "wgmma", "status"]


def render_markdown(rep: Dict[str, Any]) -> str:
    out = ["# GPU compile report (no GPU needed)", "",
           f"Targets {', '.join(rep['targets'])}; {rep['n_kernels']} builds, {rep['n_spills']} with local memory "
           f"(spill rule: {rep['spill_rule']}), {rep['n_errors']} failed; {rep['wall_s']:.1f} s.", "",
           "CTAs/SM: resident CTAs per SM from registers (allocated per warp in units of 256), shared memory "
           "(+1 KB reserved per CTA), warps and the CTA cap; loop SASS: instructions in the hot loop (the "
           "innermost loop loading the most bytes; fewer instructions on a tie); SASS/elt: those on the loop's "
           "common (shortest) path per element a thread handles per iteration "
           f"(at 1 instruction per lane per cycle an H100 issues {H100_ISSUE_PER_S / 1e12:.1f}e12 per second); "
           "KB/SM/iter: bytes the resident CTAs of one SM load per hot-loop iteration (a row kernel wants ~16-24 KB in "
           "flight); wgmma: HGMMA in the sm_90a SASS.", "",
           C.format_table(_HEAD, _table_rows(rep), markdown=True), ""]
    errs = [r for r in rep["rows"] if r["error"]]
    if errs:
        out += ["## Errors", ""] + [f"- `{r['config'] or r['source']}` {r['arch']}: {r['error']}" for r in errs] + [""]
    if rep["notes"]:
        out += ["## Modules", ""] + [f"- `{n['module']}`: {n['status']}: {n['reason']}" for n in rep["notes"]] + [""]
    return "\n".join(out)


ISSUE_TABLE = os.path.join(REPO, "hero_kernels", "backends", "sass_counts.py")


def issue_table_key(r: dict) -> str:
    """The key a launch plan looks its build up by: "triton:<config>:<aligned|unaligned>" / "cuda:<kernel<...>>"."""
    return f"triton:{r['config']}:{r['variant']}" if r["kind"] == "triton" else f"cuda:{r['config']}"


def render_issue_table(rep: Dict[str, Any]) -> str:
    """hero_kernels/backends/sass_counts.py: per sm_90a streaming build (no tensor-core instructions) with a hot
    loop: SASS instructions per element (the roofline's instruction-issue term), and the measured registers,
    resident CTAs per SM and bytes each thread loads per hot-loop iteration (the launch plans derive the bytes
    in flight per SM of the latency term from them and their own tile)."""
    import platform

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    from hero_kernels import gpu_compile

    nv = gpu_compile.nvcc_path()
    nvv = "none"
    if nv:
        import subprocess

        out = subprocess.run([nv, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        nvv = out[-1] if out else "unknown"
    builds = sorted(((issue_table_key(r), r) for r in rep["rows"]
                     if r["arch"] == "sm_90a" and not r["error"] and not r.get("mma") and r.get("hot_loop")
                     and r["hot_loop"].get("instr_per_element")), key=lambda kr: kr[0])
    lines = ['"""Measured hot-loop SASS instructions per element of the streaming kernel builds on sm_90a (GENERATED),',
             "with each build's registers, resident CTAs per SM and bytes loaded per thread per hot-loop iteration.",
             "",
             "Regenerate: ``python -m benchmarks.compile_report --cc 90 --match entropy_logprob_ --issue-table``",
             "(benchmarks/compile_report.py: the hot loop's SASS instructions x element size / bytes loaded per thread;",
             "CTAs per SM from the registers, shared memory and warps against the SM's limits). Read by the launch plans",
             "(``hero_kernels.backends.plan.sass_per_element`` / ``ctas_per_sm`` / ``load_bytes_per_thread``) for the",
             "instruction-issue and latency (bytes in flight) terms of the roofline model. Keys:",
             '"triton:<KERNEL_CONFIGS description>:<aligned|unaligned>", "cuda:<demangled kernel>". Do not edit by hand."""',
             "",
             f"TRITON_VERSION = {tv!r}",
             f"NVCC_VERSION = {nvv!r}",
             f"PYTHON = {platform.python_version()!r}",
             'ARCH = "sm_90a"',
             "",
             "SASS_PER_ELEMENT = {"]
    lines += [f"    {k!r}: {r['hot_loop']['instr_per_element']:.3f}," for k, r in builds]
    lines += ["}", ""]
    for name, get in (("REGISTERS", lambda r: r["registers"]), ("CTAS_PER_SM", lambda r: r["ctas_per_sm"]),
                      ("LOAD_BYTES_PER_THREAD", lambda r: r["hot_loop"]["load_bytes_per_thread"])):
        lines += [f"{name} = {{"] + [f"    {k!r}: {int(get(r))}," for k, r in builds if get(r) is not None]
        lines += ["}", ""]
    return "\n".join(lines)


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
    ap.add_argument("--issue-table", action="store_true",
                    help=f"also write the SASS-per-element table of the streaming builds to {os.path.relpath(ISSUE_TABLE, REPO)}")
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
    if args.issue_table:
        C.atomic_write(ISSUE_TABLE, render_issue_table(rep))
        print(f"wrote {ISSUE_TABLE}")
    print(f"{rep['n_kernels']} builds, {rep['n_spills']} spilling, {rep['n_errors']} failed "
          f"({rep['wall_s']:.1f} s); wrote {jp}, {mp_}")
    return rep["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
