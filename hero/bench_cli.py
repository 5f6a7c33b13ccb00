"""``hero bench``: the kernel micro-benchmarks (``python -m benchmarks``), listed in ``hero.cli.COMMANDS``.

The benchmark suite is not part of the wheel (``benchmarks/`` sits beside the packages in a source checkout,
and a top-level package of that name must not land in users' site-packages), so this command finds it in the
checkout that holds ``hero`` (an editable install), or in the current directory, and says so otherwise.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional


def find_benchmarks_root() -> Optional[str]:
    """The source checkout whose ``benchmarks/__main__.py`` to run: the one holding this ``hero`` package, else
    the current directory; None when neither has it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for root in (here, os.getcwd()):
        if os.path.isfile(os.path.join(root, "benchmarks", "__main__.py")):
            return root
    return None


def _bench(argv: List[str]) -> int:
    root = find_benchmarks_root()
    if root is None:
        print("hero bench: the benchmark suite ships with the source checkout, not the wheel; run it from a clone "
              "of the repository (pip install -e '.[bench]', then hero bench or python -m benchmarks)", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    return int(importlib.import_module("benchmarks.__main__").main(argv) or 0)
