"""Caption reward: does the response's own caption, WITHOUT the image, let a text-only judge answer the question?

For each completion the ``<caption>`` part (hero.omnex.template) and the row's question go to a separate
text-only causal LM (any local transformers model, by path) through a prompt with ``{caption}`` and
``{question}`` placeholders. The judge decodes greedily, in batches; its answer is the first line of the
generated text. Reward 1.0 when that answer matches the gold answer: for a yes/no gold, the answer's leading
yes/no word (hero.rewards.normalize_yes_no); otherwise normalized exact match (hero.rewards.normalize_text).
An unparsed caption scores 0.0 without a judge call.

Judge answers are cached per (caption, question) within a step: one call of the reward is one step's batch,
so duplicates (G samples often share a caption) are judged once; the cache is cleared at the next call
(``cache_per_call=False`` keeps it until ``clear_cache()``).

Trainer entry point: ``caption_reward(model_path, prompt=...)`` returns the reward callable
(``fn(completions, question=[...], answer=[...], **_) -> list[float]``, hero.rewards' convention).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from hero.rewards import UNPARSED, normalize_yes_no

from .template import parse_response

__all__ = ["DEFAULT_PROMPT", "CaptionJudge", "CaptionReward", "caption_reward", "answer_matches"]

DEFAULT_PROMPT = (
    "Image description: {caption}\nQuestion: {question}\n"
    "Answer the question from the description alone with yes, no, or a short phrase.\nAnswer:"
)


def answer_matches(pred: str, gold: str) -> bool:
    """yes/no gold: the prediction's leading yes/no word; other gold: normalized exact match."""
    from hero.rewards import normalize_text

    g = str(gold).strip().lower()
    if g in ("yes", "no"):
        return normalize_yes_no(pred) == g
    return bool(normalize_text(pred)) and normalize_text(pred) == normalize_text(gold)


class CaptionJudge:
    """Batched greedy answers of a text-only causal LM to (caption, question) prompts, with a cache.

    model: a transformers causal LM (``generate``); tokenizer: its tokenizer (padded on the left for batched
    decoding; a missing pad token falls back to eos). ``calls`` counts the prompts actually decoded.
    """

    def __init__(self, model, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 8, batch_size: int = 16,
                 device=None):
        for ph in ("{caption}", "{question}"):
            if ph not in prompt:
                raise ValueError(f"caption_judge.prompt must contain the placeholder {ph}, got {prompt!r}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError("the judge tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device = device
        self.calls = 0
        self._cache: Dict[Tuple[str, str], str] = {}

    @classmethod
    def from_pretrained(cls, path: str, **kwargs) -> "CaptionJudge":
        """Load any local causal LM + tokenizer with transformers' Auto classes (offline for a local path), on
        ``device`` when given."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path)
        if kwargs.get("device") is not None:  # the judge runs where its inputs go (the trainer's device)
            model = model.to(kwargs["device"])
        return cls(model, AutoTokenizer.from_pretrained(path), **kwargs)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _generate(self, prompts: List[str]) -> List[str]:
        import torch

        dev = self.device if self.device is not None else next(self.model.parameters()).device
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [(t.strip().splitlines() or [""])[0].strip() for t in texts]

    def answers(self, captions: Sequence[str], questions: Sequence[str]) -> List[str]:
        """The judge's answer per (caption, question); uncached distinct pairs are decoded in batches."""
        keys = [(str(c), str(q)) for c, q in zip(captions, questions)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i:i + self.batch_size]
            prompts = [self.prompt.format(caption=c, question=q) for c, q in chunk]
            self._cache.update(zip(chunk, self._generate(prompts)))
            self.calls += len(chunk)
        return [self._cache[k] for k in keys]


class CaptionReward:
    """Reward callable: 1.0 when the judge answers the row's question correctly from the caption alone.

    Fields: ``question_field`` (default "question") and ``answer_field`` (default "answer"). ``last_stats``
    holds the last call's counts (parsed captions, judge prompts decoded) for logging."""

    def __init__(self, judge: CaptionJudge, question_field: str = "question", answer_field: str = "answer",
                 cache_per_call: bool = True):
        self.judge = judge
        self.question_field = question_field
        self.answer_field = answer_field
        self.cache_per_call = cache_per_call
        self.last_stats: Dict[str, float] = {}
        self.__name__ = "caption"

    def __call__(self, completions: Sequence[str], **fields) -> List[float]:
        from hero.rewards import _aligned

        n = len(completions)
        questions = _aligned(self.question_field, fields.get(self.question_field), n)
        gold = _aligned(self.answer_field, fields.get(self.answer_field), n)
        if self.cache_per_call:
            self.judge.clear_cache()
        captions = [parse_response(c).caption for c in completions]
        idx = [i for i, c in enumerate(captions) if c != UNPARSED]
        calls0 = self.judge.calls
        preds = self.judge.answers([captions[i] for i in idx], [questions[i] for i in idx])
        out = [0.0] * n
        for i, p in zip(idx, preds):
            out[i] = 1.0 if answer_matches(p, gold[i]) else 0.0
        self.last_stats = {"parsed": float(len(idx)), "judged": float(self.judge.calls - calls0)}
        return out


def caption_reward(model_path: str, prompt: Optional[str] = None, **kwargs) -> CaptionReward:
    """The trainer's entry point: ``caption_judge.model`` (a local causal LM path) and ``caption_judge.prompt``
    (None = DEFAULT_PROMPT). Extra keywords go to CaptionJudge (max_new_tokens, batch_size, device)."""
    if not model_path:
        raise ValueError("reward 'caption' needs caption_judge.model (a local path of a causal LM)")
    return CaptionReward(CaptionJudge.from_pretrained(model_path, prompt=prompt or DEFAULT_PROMPT, **kwargs))
