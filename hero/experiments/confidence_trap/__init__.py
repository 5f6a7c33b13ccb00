"""The confidence-trap experiment: does a vision-language model stay confident as its image degrades, and does
entropy-aware RL (HERO) fix it? Run it with ``make demo`` / ``hero demo``; diagnose any VLM with ``hero diagnose``.

Modules:

* ``digits_pope``: POPE-style "Is there a 7 in the image?" task from sklearn's bundled digits (offline).
* ``tiny_vlm``: a tiny random-init vision-language model + offline tokenizer / processor.
* ``models``: the trainer adapters and builders for ``model.name`` ``tiny-vlm`` / ``tiny-llama``.
* ``sft``: the supervised warm start. ``metrics``: POPE, ECE, entropy bins, CHAIR.
* ``diagnostics``: the diagnosis (entropy / accuracy / calibration vs. image noise); ``report``: report + plots.
* ``demo``: the whole pipeline; ``diagnose_cli``: the ``hero diagnose`` / ``hero demo`` commands.

Importing this package registers ``data.name: digits_pope`` and ``model.name: tiny-vlm | tiny-llama`` (and the
formats they save) in ``hero.registry``; the builders import torch and the model code only when called.
"""
from __future__ import annotations

from hero.registry import register_dataset, register_model, register_saved_format


@register_dataset("digits_pope")
def _digits_pope(cfg):
    from .digits_pope import build_digits_pope

    d = cfg.data
    return build_digits_pope(d.n_per_split, subset="train", splits=tuple(d.splits), sigma=d.sigma, seed=cfg.seed)


@register_model("tiny-vlm")
def _tiny_vlm(mcfg, ctx):
    from .models import build_tiny_vlm_policy

    return build_tiny_vlm_policy(mcfg, ctx)


@register_model("tiny-llama")
def _tiny_llama(mcfg, ctx):
    from .models import build_tiny_llama_policy

    return build_tiny_llama_policy(mcfg, ctx)


@register_saved_format("hero-tiny-vlm")
def _saved_tiny_vlm(path, mcfg, ctx):
    from .models import load_tiny_vlm_policy

    return load_tiny_vlm_policy(path, ctx)


@register_saved_format("hero-tiny-tokenizer")
def _saved_tiny_llama(path, mcfg, ctx):
    from .models import load_tiny_llama_policy

    return load_tiny_llama_policy(path, ctx)
