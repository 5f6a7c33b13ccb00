"""hero: a lean entropy-aware (HERO-GRPO) trainer built on ``hero_kernels``.

Subpackages (import them directly; this module imports nothing heavy so ``import hero`` stays cheap):

* ``hero.data``: the digits-POPE task (``hero.data.digits_pope``) and the JSONL format for real data
  (``hero.data.jsonl``).
* ``hero.tiny_vlm``: a tiny random-init vision-language model + offline tokenizer/processor (needs transformers).
* ``hero.metrics``: POPE metrics, answer parsing, ECE, accuracy per entropy bin, CHAIR.
* ``hero.diagnostics``: the confidence-trap diagnosis (entropy / accuracy / calibration vs. image noise).
"""

__version__ = "0.1.0"
