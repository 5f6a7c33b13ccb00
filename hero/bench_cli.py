"""``hero bench``: the kernel micro-benchmarks (``python -m benchmarks``), registered with the hero CLI."""
from __future__ import annotations

from typing import List

from .cli import register_command


@register_command("bench", "run the kernel micro-benchmarks (python -m benchmarks; --help for options)")
def _bench(argv: List[str]) -> int:
    from benchmarks.__main__ import main

    return int(main(argv) or 0)
