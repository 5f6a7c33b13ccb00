"""hero: a lean entropy-aware (HERO-GRPO) trainer built on ``hero_kernels``.

Trainer core (depends on hero_kernels, torch and transformers only): ``hero.config``, ``hero.rollout``
(model adapters), ``hero.rewards``, ``hero.grpo`` (advantages, variance gate, KL controller), ``hero.trainer``,
``hero.checkpoint``, ``hero.io``, ``hero.data.jsonl``, ``hero.registry``, ``hero.cli``.

Experiments register their datasets and models in ``hero.registry``; ``hero.experiments.confidence_trap`` is
the confidence-trap study (digits-POPE, a tiny VLM, the diagnosis, ``hero demo``). Integrations with other RL
engines live in ``hero.integrations``. This module imports nothing heavy so ``import hero`` stays cheap.
"""

__version__ = "0.1.0"
