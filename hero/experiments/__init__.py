"""Experiments built on the hero trainer. Each subpackage registers its datasets and models in
``hero.registry`` when imported; the trainer core never imports an experiment itself.

* ``hero.experiments.confidence_trap``: the confidence-trap study (``hero demo``, ``hero diagnose``).
"""
