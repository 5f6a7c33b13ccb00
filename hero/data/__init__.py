"""Datasets for the hero trainer: ``hero.data.jsonl``, the JSONL format (one row per line, images by path) that
``hero train`` (``data.name: jsonl``) and ``hero diagnose`` read, with its loader and writer.

Task datasets live with their experiment and register in ``hero.registry`` (e.g. ``digits_pope`` in
``hero.experiments.confidence_trap``).
"""
from .jsonl import load_jsonl, write_jsonl

__all__ = ["load_jsonl", "write_jsonl"]
