"""Drop-in adapters that run the HERO loss inside existing RL engines.

* ``hero.integrations.trl``: ``HEROGRPOTrainer`` / ``HEROGRPOConfig``, a subclass of TRL's ``GRPOTrainer`` that
  computes the loss with ``hero_kernels.hero_loss`` on the last hidden states and the LM-head weight (no
  [tokens x vocab] logits), adds the variance gate and the adaptive KL coefficient (saved in checkpoints) and logs
  HERO's metrics next to TRL's. Needs ``trl`` (tested with trl 1.13.0).
* ``hero.integrations.verl``: ``compute_policy_loss_hero``, a policy loss with verl's policy-loss signature,
  registered as ``loss_mode=hero`` when verl is importable (importing it never fails without verl).

Nothing is imported here: ``import hero.integrations`` stays cheap and never pulls in trl or verl.
"""

__all__ = ["trl", "verl"]
