"""Reward functions: plain callables ``fn(completions, **row_fields) -> list[float]``.

Calling convention (the same as TRL's reward functions): ``completions`` is a list of N decoded completion
strings; every dataset field arrives as a keyword argument holding a list of N values aligned with
``completions`` (the G completions of one prompt repeat that prompt's row values). Unused fields are
accepted and ignored (``**_``). A reward returns N floats; NaN means "could not score" and is reported by
the trainer as a bad row.

Built in (``REWARDS`` maps config names to them):

* ``yes_no`` (``yes_no_reward``): 1.0 when the answer parsed from the ``<answer>...</answer>`` tag equals the
  gold ``answer`` ("yes"/"no"), else 0.0. Parsing is ``parse_answer`` (mode "tag"): the LAST
  complete answer tag decides, never the first sentence, so ``<think>no wait, yes</think><answer>yes</answer>``
  is "yes"; a missing or unclosed tag is wrong.
* ``exact_match`` (``exact_match_reward``): 1.0 when the answer tag body (or, when no tag is present, the
  whole completion) equals the gold ``answer`` after ``normalize_text`` (lower case, whitespace collapsed,
  trailing ``.!?`` dropped).
* ``format`` (``format_reward``): 1.0 when the completion is exactly ``<think>...</think><answer>...</answer>``
  (whitespace allowed around and between the blocks, nothing else), else 0.0.
* ``nli`` (``NLIReward``): faithfulness of the response to a reference description with an NLI
  sequence-classification model, see the class docstring.
* ``omnex_format`` (``hero.omnex.template.format_reward``): 1.0 for exactly the OMNEX-VL template
  ``<planning>..</planning><caption>..</caption><think>..</think><answer>..</answer>``.
* ``caption`` (``hero.omnex.caption.CaptionReward``): 1.0 when a text-only judge LM (``caption_model``, the
  config's ``caption_judge.model``) answers the question correctly from the response's caption alone.
"""
from __future__ import annotations

import importlib
import math
import re
from typing import Callable, Dict, List, Optional, Sequence


__all__ = [
    "REWARDS",
    "UNPARSED",
    "parse_answer",
    "normalize_yes_no",
    "yes_no_reward",
    "exact_match_reward",
    "format_reward",
    "normalize_text",
    "split_sentences",
    "NLIReward",
    "get_reward",
    "reward_names",
    "unknown_reward",
]

#: Prediction value for an output whose answer could not be extracted (always counted as wrong).
UNPARSED = "unparsed"

RewardFn = Callable[..., List[float]]

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FORMAT_RE = re.compile(r"^\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?think>|</?answer>).)*</answer>\s*$", re.DOTALL)
_YESNO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def normalize_yes_no(content: str) -> str:
    """Normalize an answer body: strip, lowercase, drop trailing punctuation; "Yes, there is." -> "yes".

    Returns "yes"/"no" when the body starts with that word, else the normalized free text,
    or ``UNPARSED`` when it is empty.
    """
    s = content.strip().lower()
    m = re.match(r"^(yes|no)\b", s)
    if m:
        return m.group(1)
    s = s.rstrip(" .!?")
    return s if s else UNPARSED


def parse_answer(text: str, mode: str = "tag") -> str:
    """Extract the answer from a model output.

    mode="tag" (default): the body of the LAST complete ``<answer>...</answer>`` pair, normalized with
    ``normalize_yes_no`` ("yes"/"no" or lower-cased free text). Missing tag, missing closing tag
    (e.g. generation cut by max_new_tokens) or an empty body -> ``"unparsed"``.
    mode="yesno": for models without tags; the first standalone "yes"/"no" word (case-insensitive),
    else ``"unparsed"``. If the text does contain a complete answer tag, the tag wins.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if mode not in ("tag", "yesno"):
        raise ValueError(f"mode must be 'tag' or 'yesno', got {mode!r}")
    bodies = _ANSWER_RE.findall(text)
    if bodies:
        return normalize_yes_no(bodies[-1])
    if mode == "yesno":
        m = _YESNO_RE.search(text)
        return m.group(1).lower() if m else UNPARSED
    return UNPARSED


def _aligned(name: str, values, n: int) -> List:
    if values is None:
        raise KeyError(f"reward needs the row field {name!r}, which the dataset rows do not have")
    values = list(values)
    if len(values) != n:
        raise ValueError(f"row field {name!r} has {len(values)} values for {n} completions")
    return values


def yes_no_reward(completions: Sequence[str], answer: Optional[Sequence[str]] = None, **_) -> List[float]:
    """1.0 if the ``<answer>`` tag's yes/no equals the gold ``answer`` (case-insensitive), else 0.0."""
    gold = _aligned("answer", answer, len(completions))
    out = []
    for c, g in zip(completions, gold):
        p = parse_answer(c)
        out.append(1.0 if p != UNPARSED and p == str(g).strip().lower() else 0.0)
    return out


def normalize_text(s: str) -> str:
    """Lower case, whitespace collapsed, surrounding whitespace and trailing ``.!?`` dropped."""
    s = " ".join(str(s).split()).lower()
    return s.rstrip(".!? ").strip()


def exact_match_reward(completions: Sequence[str], answer: Optional[Sequence[str]] = None, **_) -> List[float]:
    """1.0 if the last answer-tag body (whole text when untagged) equals ``answer`` after normalize_text."""
    gold = _aligned("answer", answer, len(completions))
    out = []
    for c, g in zip(completions, gold):
        bodies = _ANSWER_RE.findall(c)
        pred = bodies[-1] if bodies else c
        out.append(1.0 if normalize_text(pred) == normalize_text(g) and normalize_text(g) != "" else 0.0)
    return out


def format_reward(completions: Sequence[str], **_) -> List[float]:
    """1.0 for exactly ``<think>...</think><answer>...</answer>`` (no nested/extra tags, no text outside)."""
    return [1.0 if _FORMAT_RE.match(c) else 0.0 for c in completions]


_TAG_RE = re.compile(r"</?(?:think|answer)>")
_SENT_RE = re.compile(r"[^.!?\n]+[.!?]*")


def split_sentences(text: str) -> List[str]:
    """Sentences of a response: tags removed, split after ``.``/``!``/``?`` and at newlines; pieces with
    no letter or digit are dropped."""
    t = _TAG_RE.sub("\n", text)
    return [s.strip() for s in _SENT_RE.findall(t) if re.search(r"\w", s)]


class NLIReward:
    """Faithfulness reward from an NLI model: P(entail) - P(contradict), in [-1, 1].

    For each response, the premise is the row's reference description (field ``reference_field``) and each
    sentence of the response (``split_sentences``: tags removed) is a hypothesis. The per-response reward is
    the ``reduce`` of the sentence scores: ``"mean"`` (default; average faithfulness) or ``"min"`` (one
    hallucinated sentence sinks the response). A response with no sentence scores 0.0 (neutral). The
    entailment / contradiction class indices come from ``model.config.label2id`` (keys matched
    case-insensitively by prefix "entail" / "contradict"), never assumed.

    model: a transformers ``AutoModelForSequenceClassification``; tokenizer: its tokenizer (pair encoding).
    Runs under ``torch.no_grad()`` in eval mode, ``batch_size`` pairs at a time.
    """

    def __init__(self, model, tokenizer, reference_field: str = "description", reduce: str = "mean",
                 batch_size: int = 32, max_length: int = 256, device=None):
        if reduce not in ("mean", "min"):
            raise ValueError(f"reduce must be 'mean' or 'min', got {reduce!r}")
        l2i = getattr(model.config, "label2id", None) or {}
        self.entail_id = self._find(l2i, "entail")
        self.contra_id = self._find(l2i, "contradict")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.reference_field = reference_field
        self.reduce = reduce
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device
        self.__name__ = "nli"

    @staticmethod
    def _find(label2id: Dict[str, int], prefix: str) -> int:
        hits = [int(v) for k, v in label2id.items() if str(k).lower().startswith(prefix)]
        if len(hits) != 1:
            raise ValueError(
                f"NLI model config.label2id must have exactly one label starting with {prefix!r}, got {dict(label2id)}"
            )
        return hits[0]

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> "NLIReward":
        """Load model + tokenizer with transformers' Auto classes (a local path works offline)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return cls(AutoModelForSequenceClassification.from_pretrained(name_or_path),
                   AutoTokenizer.from_pretrained(name_or_path), **kwargs)

    def sentence_scores(self, premises: Sequence[str], hypotheses: Sequence[str]) -> List[float]:
        """P(entail) - P(contradict) for each (premise, hypothesis) pair."""
        import torch

        out: List[float] = []
        dev = self.device if self.device is not None else next(self.model.parameters()).device
        for i in range(0, len(premises), self.batch_size):
            p = list(premises[i : i + self.batch_size])
            h = list(hypotheses[i : i + self.batch_size])
            enc = self.tokenizer(p, h, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length)
            enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                probs = self.model(**enc).logits.float().softmax(-1)
            out.extend((probs[:, self.entail_id] - probs[:, self.contra_id]).tolist())
        return out

    def __call__(self, completions: Sequence[str], **fields) -> List[float]:
        refs = _aligned(self.reference_field, fields.get(self.reference_field), len(completions))
        premises, hyps, owner = [], [], []
        for j, (c, r) in enumerate(zip(completions, refs)):
            for s in split_sentences(c):
                premises.append(str(r))
                hyps.append(s)
                owner.append(j)
        scores = self.sentence_scores(premises, hyps) if premises else []
        per: List[List[float]] = [[] for _ in completions]
        for j, s in zip(owner, scores):
            per[j].append(s)
        red = min if self.reduce == "min" else (lambda xs: sum(xs) / len(xs))
        return [red(xs) if xs else 0.0 for xs in per]


#: Config names of the built-in reward functions ("nli" needs a model: see ``get_reward``).
REWARDS: Dict[str, RewardFn] = {
    "yes_no": yes_no_reward,
    "exact_match": exact_match_reward,
    "format": format_reward,
}


#: Names ``get_reward`` builds besides ``REWARDS`` (each needs options or a lazily imported module).
BUILT_REWARDS = ("nli", "caption", "omnex_format")


def reward_names() -> List[str]:
    """Every reward name a config may use (besides "package.module:function")."""
    return sorted(REWARDS) + list(BUILT_REWARDS)


def unknown_reward(name: str) -> str:
    """"" when ``name`` is a known reward name or looks like "package.module:function", else the error text."""
    if name in REWARDS or name in BUILT_REWARDS or (":" in name and all(name.partition(":")[::2])):
        return ""
    return f"unknown reward {name!r}; known: {reward_names()} or 'package.module:function'"


def get_reward(name: str, *, nli_model: str = "", nli_reference_field: str = "description",
               nli_reduce: str = "mean", caption_model: str = "", caption_prompt: str = "",
               caption_options: Optional[Dict] = None) -> RewardFn:
    """A reward callable by config name: a ``REWARDS`` key, ``"nli"`` (loads ``nli_model``), ``"caption"``
    (loads the judge ``caption_model`` with ``caption_prompt``; ``caption_options`` go to
    ``hero.omnex.caption.CaptionJudge``), ``"omnex_format"``, or ``"package.module:function"``."""
    if name in REWARDS:
        return REWARDS[name]
    if name == "nli":
        if not nli_model:
            raise ValueError("reward 'nli' needs rewards.nli_model (a local path or id of an NLI classifier)")
        return NLIReward.from_pretrained(nli_model, reference_field=nli_reference_field, reduce=nli_reduce)
    if name == "omnex_format":
        from hero.omnex.template import omnex_format_reward

        return omnex_format_reward
    if name == "caption":
        from hero.omnex.caption import caption_reward

        return caption_reward(caption_model, prompt=caption_prompt or None, **(caption_options or {}))
    problem = unknown_reward(name)
    if problem:
        raise ValueError(problem)
    mod, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward {name!r} could not be imported: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def reward_name(fn) -> str:
    """Name used in logs (rewards/<name>/mean)."""
    return getattr(fn, "__name__", type(fn).__name__).replace("_reward", "")


def check_rewards(values, n: int, name: str) -> List[float]:
    """Validate a reward function's output: a list of n numbers (NaN allowed; the trainer reports them)."""
    try:
        vals = [float(v) if v is not None else math.nan for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"reward {name!r} must return a list of numbers, got {values!r:.200}") from None
    if len(vals) != n:
        raise ValueError(f"reward {name!r} returned {len(vals)} values for {n} completions")
    return vals
