"""Datasets for the hero trainer and diagnostics.

* ``hero.data.digits_pope``: POPE-style "Is there a 7 in the image?" task from sklearn's bundled digits.
* ``hero.data.jsonl``: the JSONL format ``hero diagnose`` reads for real data, loader and writer.
"""
from .digits_pope import SIGMAS, SPLITS, build_digits_pope, cot_target, with_noise
from .jsonl import load_jsonl, write_jsonl

__all__ = ["SIGMAS", "SPLITS", "build_digits_pope", "cot_target", "with_noise", "load_jsonl", "write_jsonl"]
