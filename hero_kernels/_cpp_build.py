"""Build and load the C++ / CUDA extension in ``csrc/`` on first use (never at import time).

The extension registers ``torch.ops.hero_kernels_cpp.entropy_logprob_fwd`` / ``entropy_logprob_bwd`` with
CPU (always), CUDA (when built with CUDA) and Meta kernels, and ``grad_sketch_fwd`` / ``grad_sketch_bwd`` (CPU,
Meta). It is compiled by
``torch.utils.cpp_extension.load`` with ninja, once per distinct build, into a cache:
``$HERO_KERNELS_BUILD_DIR`` or ``~/.cache/hero_kernels``, one sub-directory per KEY, a hash of the source
contents, the build flags, the variant and the torch / python versions (never of the source's path, so every
checkout or install with the same sources shares one build). A key whose library exists is loaded directly
(no ninja, no compiler check); a missing one is built in a private temporary folder and published by an atomic
rename, so concurrent processes never see a half-built library and never rebuild an existing key. While a
build runs, one line says so on stderr.

* CPU-only build (the CPU kernels, the bindings): whenever CUDA is not available.
* CUDA build (adds ``entropy_logprob_cuda.cu``): only when ``torch.cuda.is_available()``, torch was built
  with CUDA and an ``nvcc`` is found. If that build fails, the CPU-only build is tried so ``impl="cpu"``
  still works, and the CUDA failure is kept for ``cuda_build_error()``.

A failed build never breaks ``import hero_kernels``: the error is stored and raised (with the reason)
when ``impl="cpu"`` / ``impl="cuda"`` is requested.

Environment:
  HERO_KERNELS_BUILD_DIR     build cache root
  HERO_KERNELS_NO_BUILD=1    never build: the backends report themselves unavailable
  HERO_KERNELS_NO_CUDA=1     build the CPU-only variant even where CUDA is available
  HERO_KERNELS_VERBOSE_BUILD=1  show the compiler commands and output
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Optional

__all__ = [
    "cpu_available",
    "cuda_available",
    "load",
    "build_error",
    "cuda_build_error",
    "build_info",
    "require_cpu",
    "require_cuda",
    "csrc_dir",
    "cache_entry",
]

_LOCK = threading.RLock()
_STATE = {
    "ops": None,  # torch.ops.hero_kernels_cpp once loaded
    "error": None,  # why the extension is unusable (str)
    "cuda": False,  # loaded build contains the CUDA kernels
    "cuda_error": None,  # why the CUDA kernels are missing (str), when CUDA was wanted
    "seconds": None,  # wall time of the build/load call
    "path": None,  # the loaded shared library
    "built": None,  # this process compiled it (False: loaded from the cache)
}

_CPU_SOURCES = ("entropy_logprob_cpu.cpp", "grad_sketch_cpu.cpp", "bindings.cpp")
_CUDA_SOURCES = ("entropy_logprob_cuda.cu",)
_ALL_FILES = ("hero_rowmath.h", "hero_cpu.h", "hero_kernels.h") + _CPU_SOURCES + _CUDA_SOURCES


def csrc_dir() -> Optional[Path]:
    """The csrc/ folder: next to the package in a checkout, or inside it when installed as package data."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    return None


def _build_root() -> Path:
    root = os.environ.get("HERO_KERNELS_BUILD_DIR")
    return Path(root) if root else Path.home() / ".cache" / "hero_kernels"


def _flags(with_cuda: bool) -> dict:
    """Compiler / linker flags of one variant (part of the cache key)."""
    # -ffp-contract=off: x = z / tau must be rounded on its own in the forward and the backward alike
    # (csrc/hero_rowmath.h); it also makes every target_clones variant (with and without FMA) agree bitwise.
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off"] + (["-DHK_WITH_CUDA"] if with_cuda else [])
    cuda_cflags = ["-O3", "-lineinfo", "-DHK_WITH_CUDA"] if with_cuda else []
    return {"extra_cflags": cflags, "extra_cuda_cflags": cuda_cflags, "extra_ldflags": ["-fopenmp"]}


def _cache_key(src: Path, with_cuda: bool) -> str:
    """Hash of everything that makes one build differ from another: source contents (headers included), flags,
    variant, torch / CUDA / python versions and the compiler / arch settings read from the environment."""
    import torch

    h = hashlib.sha256()
    for name in _ALL_FILES:
        p = src / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    env = {k: os.environ.get(k, "") for k in ("CXX", "CC", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")} if with_cuda \
        else {k: os.environ.get(k, "") for k in ("CXX", "CC")}
    h.update(repr((with_cuda, _flags(with_cuda), torch.__version__, torch.version.cuda, sys.version_info[:2],
                   sorted(env.items()))).encode())
    return h.hexdigest()[:16]


def _lib_ext() -> str:
    return ".pyd" if sys.platform == "win32" else ".so"


def _remove_stale_builds(root: Path) -> None:
    """Temporary build folders of processes that no longer run (killed mid-build) are removed."""
    for d in root.glob(".tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
            os.kill(pid, 0)  # raises if the process is gone
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue


def _ensure_ninja() -> None:
    """cpp_extension runs `ninja` from PATH; an un-activated venv has it only in its bin/ or the ninja wheel."""
    if shutil.which("ninja"):
        return
    extra = [os.path.dirname(sys.executable)]
    try:
        import ninja  # type: ignore

        extra.insert(0, ninja.BIN_DIR)
    except Exception:
        pass
    for d in extra:
        if os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return
    raise RuntimeError("ninja is not installed (pip install ninja); it is needed to build the C++ extension")


def _cuda_wanted() -> tuple:
    """(want, reason_if_not). Only probes CUDA when called (first use), never at import."""
    import torch

    if os.environ.get("HERO_KERNELS_NO_CUDA") == "1":
        return False, "HERO_KERNELS_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if not nvcc or not os.path.isfile(nvcc):
        return False, "nvcc not found (set CUDA_HOME to a CUDA toolkit matching torch)"
    return True, None


def _short(exc: BaseException, limit: int = 4000) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[:1000] + "\n...\n" + text[-(limit - 1000):]


def cache_entry(src: Path, with_cuda: bool) -> tuple:
    """(folder, library path) of this build in the cache; the folder exists only once the build is complete."""
    import torch

    variant = "cuda" if with_cuda else "cpu"
    tag = f"{variant}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    tag = "".join(c if c.isalnum() or c in "._-" else "_" for c in tag)
    final = _build_root() / f"{tag}-{_cache_key(src, with_cuda)}"
    return final, final / f"hero_kernels_cpp_{variant}{_lib_ext()}"


def _build(with_cuda: bool, src: Path) -> str:
    """Load the cached library of this (sources, flags, variant) key, building it first when it is missing.
    Returns the library path."""
    import torch
    from torch.utils import cpp_extension

    final, lib = cache_entry(src, with_cuda)
    name = lib.name[: -len(_lib_ext())]
    root = final.parent
    if lib.is_file():  # published only after a complete build: never rebuilt, not even checked by ninja
        torch.ops.load_library(str(lib))
        _STATE["built"] = False
        return str(lib)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    what = "CUDA" if with_cuda else "CPU"
    print(f"building the hero_kernels {what} extension (first use, ~{'3' if with_cuda else '1'} min)...",
          file=sys.stderr, flush=True)
    try:
        cpp_extension.load(
            name=name,
            sources=[str(src / s) for s in _CPU_SOURCES + (_CUDA_SOURCES if with_cuda else ())],
            extra_include_paths=[str(src)],
            build_directory=str(tmp),
            verbose=os.environ.get("HERO_KERNELS_VERBOSE_BUILD") == "1",
            with_cuda=with_cuda,
            is_python_module=False,
            **_flags(with_cuda),
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _STATE["built"] = True
    try:
        os.rename(tmp, final)  # atomic publish (the loaded library stays mapped under its old name)
    except OSError:  # another process published the same key first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(lib)


def load():
    """Build (first call only) and load the extension; returns ``torch.ops.hero_kernels_cpp``.

    Raises RuntimeError with the reason when it cannot be built; later calls re-raise the stored reason
    without retrying (a failed compile is not retried within one process).
    """
    with _LOCK:
        if _STATE["ops"] is not None:
            return _STATE["ops"]
        if _STATE["error"] is not None:
            raise RuntimeError(_STATE["error"])
        import torch

        t0 = time.perf_counter()
        try:
            if os.environ.get("HERO_KERNELS_NO_BUILD") == "1":
                raise RuntimeError("HERO_KERNELS_NO_BUILD=1 is set")
            src = csrc_dir()
            if src is None:
                raise RuntimeError("csrc/ (bindings.cpp) not found next to the hero_kernels package")
            _ensure_ninja()
            want_cuda, why_not = _cuda_wanted()
            path = None
            if want_cuda:
                try:
                    path = _build(True, src)
                    _STATE["cuda"] = True
                except Exception as exc:  # keep CPU usable; remember why CUDA is not
                    _STATE["cuda_error"] = "the CUDA build failed: " + _short(exc)
            else:
                _STATE["cuda_error"] = why_not
            if path is None:
                path = _build(False, src)
            _STATE["path"] = path
            _STATE["ops"] = torch.ops.hero_kernels_cpp
        except Exception as exc:
            _STATE["error"] = (
                "hero_kernels C++ extension is unavailable: "
                + _short(exc)
                + f"\n(build dir {_build_root()}; set HERO_KERNELS_VERBOSE_BUILD=1 for the compiler output)"
            )
            raise RuntimeError(_STATE["error"]) from exc
        finally:
            _STATE["seconds"] = time.perf_counter() - t0
        return _STATE["ops"]


def cpu_available() -> bool:
    """True when the extension builds and loads (builds it on the first call)."""
    try:
        load()
        return True
    except RuntimeError:
        return False


def cuda_available() -> bool:
    """True when a CUDA device is usable and the loaded extension contains the CUDA kernels."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        return False
    return cpu_available() and bool(_STATE["cuda"])


def build_error() -> Optional[str]:
    """Why the extension is unavailable (None when it loaded or was never tried)."""
    return _STATE["error"]


def cuda_build_error() -> Optional[str]:
    """Why the loaded extension has no CUDA kernels (None when it has them or nothing was tried)."""
    return _STATE["error"] if _STATE["error"] is not None else _STATE["cuda_error"]


def build_info() -> dict:
    """Facts about the last load: seconds (build + load wall time), path, built (compiled in this process,
    False when loaded from the cache), cuda, errors."""
    return {k: v for k, v in _STATE.items() if k != "ops"}


def require_cpu():
    """The ops, or RuntimeError saying why impl='cpu' cannot run."""
    try:
        return load()
    except RuntimeError as exc:
        raise RuntimeError(f"impl='cpu' is unavailable: {exc}") from None


def require_cuda():
    """The ops, or RuntimeError saying why impl='cuda' cannot run."""
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        raise RuntimeError("impl='cuda' is unavailable: no CUDA device (torch.cuda.is_available() is False)")
    try:
        ops = load()
    except RuntimeError as exc:
        raise RuntimeError(f"impl='cuda' is unavailable: {exc}") from None
    if not _STATE["cuda"]:
        raise RuntimeError(f"impl='cuda' is unavailable: {_STATE['cuda_error']}")
    return ops
