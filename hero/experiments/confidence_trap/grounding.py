"""OMNEX-VL's caption reward on digits-POPE, with an exact text-only judge.

The tiny VLM of this experiment answers ``<think>I see 3, 1, 4.</think><answer>no</answer>``: its ``<think>``
block is the caption of the image (the digits it claims to see). OMNEX-VL's caption reward asks a text-only
judge to answer the question from the caption alone; for "Is there a 7 in the image?" the judge's answer is
fully determined by the caption (yes iff 7 is among the named digits), so this module judges by that rule
instead of an LM (``hero.omnex.caption`` is the LM judge, ``rewards.funcs: [caption]``, for real tasks).
Used as ``rewards.funcs: [..., "hero.experiments.confidence_trap.grounding:caption_reward"]`` by the demo's
``omnex`` runs; its log name is ``caption`` (``rewards/caption/*`` and ``omnex/caption_reward``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from .metrics import _THINK_RE, mentioned_digits

__all__ = ["caption_reward"]


def caption_reward(completions: Sequence[str], query: Optional[Sequence[int]] = None,
                   answer: Optional[Sequence[str]] = None, **_) -> List[float]:
    """1.0 when the digits named in the completion's ``<think>`` caption answer the row's question (``query``
    digit, gold ``answer`` yes/no) correctly, else 0.0 (no caption: 0.0). Rows need ``query`` and ``answer``."""
    from hero.rewards import _aligned

    n = len(completions)
    query, answer = _aligned("query", query, n), _aligned("answer", answer, n)
    out = []
    for text, q, gold in zip(completions, query, answer):
        if not _THINK_RE.search(text):
            out.append(0.0)
            continue
        says_yes = int(q) in mentioned_digits(text)
        out.append(1.0 if says_yes == (str(gold).strip().lower() == "yes") else 0.0)
    return out
