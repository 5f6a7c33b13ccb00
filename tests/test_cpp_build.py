"""The C++ extension cache: keyed by the sources' contents and the build flags (never by their path), a key that
exists is loaded without rebuilding, and a build announces itself with one line on stderr.

Two copies of the package (two "checkouts") in temporary folders share one HERO_KERNELS_BUILD_DIR; each runs in
its own process, as two checkouts would."""
import os
import shutil
import subprocess
import sys

import pytest

from hero_kernels import _cpp_build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = "building the hero_kernels CPU extension (first use, ~1 min)..."
PROBE = ("import json, torch\n"
         "from hero_kernels import _cpp_build\n"
         "ops = _cpp_build.load()\n"
         "x = torch.randn(3, 5)\n"
         "lp, H, lse = ops.entropy_logprob_fwd(x, torch.tensor([0, 4, 2]), 1.0, -100)\n"
         "assert torch.isfinite(lp).all()\n"
         "info = _cpp_build.build_info()\n"
         "print(json.dumps({'built': info['built'], 'path': info['path'], 'file': _cpp_build.__file__}))\n")


def _checkout(dest, edit=None):
    """A copy of the package and its csrc/ under ``dest`` (optionally with a changed header)."""
    shutil.copytree(os.path.join(REPO, "hero_kernels"), dest / "hero_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(REPO, "csrc"), dest / "csrc")
    if edit:
        with open(dest / "csrc" / "hero_kernels.h", "a") as f:
            f.write(f"\n// {edit}\n")
    return dest


def _run(checkout, cache):
    import json

    env = dict(os.environ, HERO_KERNELS_BUILD_DIR=str(cache), HERO_KERNELS_NO_CUDA="1", PYTHONPATH=str(checkout))
    env.pop("HERO_KERNELS_NO_BUILD", None)
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=str(checkout), env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(checkout))  # the copy ran, not the repository's package
    return info, r.stderr


@pytest.fixture(scope="module")
def seeded_cache(tmp_path_factory):
    """A cache holding the CPU build of the repository's sources (copied from this process's cache after
    building it there if needed), so the sharing test needs no compile of its own."""
    _cpp_build.load()
    src = _cpp_build.csrc_dir()
    entry, lib = _cpp_build.cache_entry(src, with_cuda=False)
    if not lib.is_file():
        pytest.skip("this process loaded the CUDA variant; the CPU entry is not in the cache")
    cache = tmp_path_factory.mktemp("cache")
    shutil.copytree(entry, cache / entry.name)
    return cache


def test_two_checkouts_share_one_build(tmp_path, seeded_cache):
    """Same sources at two paths: both load the existing build (no rebuild, no message), from one folder."""
    a, _ = _run(_checkout(tmp_path / "a"), seeded_cache)
    b, err_b = _run(_checkout(tmp_path / "b"), seeded_cache)
    a2, err_a2 = _run(tmp_path / "a", seeded_cache)
    assert a["built"] is False and b["built"] is False and a2["built"] is False
    assert a["path"] == b["path"] == a2["path"] and a["path"].startswith(str(seeded_cache))
    assert MESSAGE not in err_b + err_a2
    assert len([d for d in seeded_cache.iterdir()]) == 1  # one entry, nothing half-built left


@pytest.mark.slow
def test_changed_sources_build_once_with_one_line(tmp_path):
    """Changed sources are a new key: the first process builds it (one line on stderr), a second checkout
    with the same change loads that build without compiling (~1-3 min: one real compile)."""
    cache = tmp_path / "cache"
    c1, err1 = _run(_checkout(tmp_path / "c1", edit="changed"), cache)
    assert c1["built"] is True and err1.count(MESSAGE) == 1, err1[-2000:]
    c2, err2 = _run(_checkout(tmp_path / "c2", edit="changed"), cache)
    assert c2["built"] is False and MESSAGE not in err2 and c2["path"] == c1["path"]
    assert not [d for d in cache.iterdir() if d.name.startswith(".tmp-")]


def test_wheel_carries_the_extension_sources():
    """hero_kernels/csrc links to csrc/ and pyproject's package data globs match every source file, so a
    non-editable install (wheel) can build impl="cpu" / "cuda" on first use (_cpp_build.csrc_dir finds it)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    link = root / "hero_kernels" / "csrc"
    assert link.is_symlink() and link.resolve() == (root / "csrc").resolve()
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hero_kernels"]
    sources = [p.name for p in (root / "csrc").iterdir() if p.is_file()]
    assert sources and all(any(fnmatch.fnmatch(f"csrc/{n}", g) for g in globs) for n in sources), (sources, globs)
