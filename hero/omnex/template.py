"""The visual-grounded response template and its format reward.

    <planning>...</planning><caption>...</caption><think>...</think><answer>...</answer>

(planning locates the relevant image regions, caption describes them, think reasons, answer answers;
whitespace is allowed around and between the blocks). ``parse_response`` never raises on text: each part is
its stripped body, or ``UNPARSED`` ("unparsed", as in hero.rewards) when the part is missing, unclosed, nested,
empty or appears more than once; ``well_formed`` is True only for the exact template in order with every
part parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Sequence

from hero.rewards import UNPARSED

__all__ = ["PARTS", "UNPARSED", "ParsedResponse", "parse_response", "format_reward", "omnex_format_reward"]

PARTS = ("planning", "caption", "think", "answer")
_ANY_TAG = re.compile(r"</?(?:planning|caption|think|answer)>")
_TEMPLATE = re.compile(r"^\s*" + r"\s*".join(rf"<{p}>(.*?)</{p}>" for p in PARTS) + r"\s*$", re.DOTALL)


@dataclass(frozen=True)
class ParsedResponse:
    """Bodies of the four parts (``UNPARSED`` when not extractable) and whether the whole template matched."""

    planning: str
    caption: str
    think: str
    answer: str
    well_formed: bool

    def part(self, name: str) -> str:
        if name not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {name!r}")
        return getattr(self, name)


def _part(text: str, name: str) -> str:
    """The body of the single <name>...</name> block, or UNPARSED (missing, unclosed, repeated, nested, empty)."""
    if text.count(f"<{name}>") != 1 or text.count(f"</{name}>") != 1:
        return UNPARSED
    start = text.index(f"<{name}>") + len(name) + 2
    end = text.find(f"</{name}>")
    if end < start:
        return UNPARSED
    body = text[start:end]
    if _ANY_TAG.search(body) or not body.strip():
        return UNPARSED
    return body.strip()


def parse_response(text) -> ParsedResponse:
    """Parse one completion; non-string input counts as unparsed (never an exception)."""
    if not isinstance(text, str):
        return ParsedResponse(UNPARSED, UNPARSED, UNPARSED, UNPARSED, False)
    parts = [_part(text, p) for p in PARTS]
    well = bool(_TEMPLATE.match(text)) and UNPARSED not in parts
    return ParsedResponse(*parts, well_formed=well)


def format_reward(completions: Sequence[str], **_) -> List[float]:
    """1.0 when a completion is exactly the four-part template (see the module docstring), else 0.0.
    Reward-function convention of hero.rewards: usable as ``hero.omnex.template:format_reward``."""
    return [1.0 if parse_response(c).well_formed else 0.0 for c in completions]


def omnex_format_reward(completions: Sequence[str], **_) -> List[float]:
    """``format_reward`` under the trainer's reward name "omnex_format" (logged as rewards/omnex_format/*, apart
    from hero.rewards' think/answer "format")."""
    return format_reward(completions)
