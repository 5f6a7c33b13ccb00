"""OMNEX-VL grounding modules, usable on their own and wired into the trainer (hero.trainer):

* ``hero.omnex.template``: the ``<planning><caption><think><answer>`` response template, ``parse_response``
  (an "unparsed" state, never an exception) and ``format_reward``.
* ``hero.omnex.caption``: the caption reward (a text-only judge LM answers the question from the caption);
  ``caption_reward(model_path, prompt)`` builds the reward callable.
* ``hero.omnex.ntk``: sketched last-layer gradient features, their cosine similarities and the InfoNCE
  NTK-conflict regularizer (``NTKRegularizer``), built on ``hero_kernels.linear_grad_sketch``.
* ``hero.omnex.hook``: the regularizer as the trainer's per-micro-batch hook (``TrainConfig.omnex``).

Trainer config: ``rewards.funcs: [caption, omnex_format, ...]`` with ``caption_judge.model`` / ``.prompt``;
``gate.keep_frac: 0.5`` (variance-guided selection, up to G = 64 samples per input); ``omnex.ntk_weight``,
``omnex.tau``, ``omnex.k1`` / ``omnex.k2``. Each is switched on its own.

Importing this package loads neither transformers nor the kernels.
"""
from .caption import DEFAULT_PROMPT, CaptionJudge, CaptionReward, answer_matches, caption_reward
from .hook import NTKHook, build_ntk_hook
from .ntk import NTKRegularizer, Sketch, cosine_similarities, make_sketch, ntk_conflict_loss, response_features
from .template import PARTS, ParsedResponse, format_reward, omnex_format_reward, parse_response

__all__ = [
    "PARTS", "ParsedResponse", "parse_response", "format_reward", "omnex_format_reward",
    "DEFAULT_PROMPT", "CaptionJudge", "CaptionReward", "caption_reward", "answer_matches",
    "Sketch", "make_sketch", "response_features", "cosine_similarities", "ntk_conflict_loss", "NTKRegularizer",
    "NTKHook", "build_ntk_hook",
]
