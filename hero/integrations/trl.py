"""HERO-GRPO as a drop-in for TRL's ``GRPOTrainer`` (tested with trl 1.13.0, transformers 5.24, accelerate 1.15).

::

    from hero.integrations.trl import HEROGRPOConfig, HEROGRPOTrainer

    args = HEROGRPOConfig(output_dir="out", loss_type="grpo", kappa=1.0, variance_gate=True, keep_frac=0.6,
                          beta=0.04, kl_target=0.02)
    trainer = HEROGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=ds,
                              processing_class=tokenizer)
    trainer.train()

Everything else (generation, vLLM, rewards, advantages, accelerate / DeepSpeed / FSDP, logging) is TRL's own code.
What changes, and where (the override points of TRL 1.13's ``GRPOTrainer``):

``compute_loss``
    Replaces TRL's ``_compute_loss``. The completion tokens' last hidden states come from the backbone without the
    LM head (TRL's ``_get_last_hidden_state``; image batches pass every multimodal input, ``_hero_last_hidden``,
    so vision-language models such as Qwen2-VL train on this path) and go with ``lm_head.weight`` into
    ``hero_kernels.hero_loss``: log-probs, entropies, HERO weights, the clipped objective and the k3 KL term without
    ever building the [tokens x vocab] logits. The call runs inside the wrapped model's ``forward`` (TRL's
    ``_ForwardRedirection``, the same route TRL's Liger loss takes) so DDP / FSDP hooks see a normal forward.
    ``lm_head_path="logits"`` instead runs the full model and feeds the logits to ``hero_loss`` (needed for DeepSpeed
    ZeRO-3, whose sharded LM head is only gathered inside its own forward; ``"auto"`` picks it there).
``_generate_and_score_completions`` (+ ``_calculate_rewards`` to keep the gathered rewards)
    Post-processes TRL's batch: the variance gate (VG-HNM, ``hero.grpo.variance_gate``) keeps the ``keep_frac``
    groups of the GLOBAL batch with the largest reward variance (zero-variance groups always go), zeroes the
    advantages of the others and masks them out of the loss (``hero_keep``); it also stores the global counts of
    kept tokens / responses that the loss uses as its normalizer (gradient-accumulation and data-parallel invariant).
    TRL's advantages (``scale_rewards``, ``multi_objective_aggregation``) are kept as they are.
``_save_checkpoint`` / ``_load_optimizer_and_scheduler``
    Write / read ``hero_trainer_state.json`` (the adaptive KL controller's ``state_dict``) in each checkpoint
    folder: the hooks TRL 1.13 itself uses for its adaptive entropy coefficient, so the state travels with the
    checkpoint and comes back on ``trainer.train(resume_from_checkpoint=...)`` (verl #2653 lost it).

TRL ``loss_type`` -> ``hero_loss`` aggregation (``loss_agg=None`` derives it; set ``loss_agg`` to override):
``"grpo"`` -> ``seq-mean-token-mean`` (HERO's own form), ``"dapo"`` / ``"bnpo"`` -> ``token-mean``, ``"dr_grpo"`` ->
``seq-mean-token-sum-norm`` with ``max_len = max_completion_length``. The denominator is always the global count
of the generation batch (tokens or responses, all ranks), divided for gradient accumulation as TRL's ``dapo`` does;
with no masked-out response and equal micro-batches it equals TRL's own value for every one of these loss types
(``bnpo``'s per-micro-batch token count becomes the global one).

Logged next to TRL's metrics (same names where TRL has them): ``entropy``, ``kl``, ``clip_ratio/low_mean``,
``clip_ratio/high_mean``, ``clip_ratio/region_mean``, plus ``entropy/min``, ``entropy/max``, ``weights/max``,
``weights/effective_tokens``, ``kl_coef``, ``gate/kept_frac``, ``gate/threshold``, ``gate/all_correct``,
``gate/all_wrong``, ``gate/zero_std``.

Not supported (a clear error at construction): ``loss_type`` cispo / sapo / luspo / vespo,
``importance_sampling_level="sequence"``, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, ``delta``,
``use_bias_correction_kl=True`` with ``beta != 0`` (``HEROGRPOConfig`` defaults it to False), the entropy bonus
(``entropy_coef`` / ``use_adaptive_entropy``), ``use_liger_kernel``, and MoE router aux loss on the fused path.
vLLM importance-sampling correction IS supported: the (non-negative) ratio multiplies the per-token advantages,
which scales the clipped term exactly like TRL's product.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

try:
    import trl as _trl
    from trl import GRPOConfig, GRPOTrainer
except ImportError as _e:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "hero.integrations.trl needs TRL (tested with trl==1.13.0): pip install 'hero-kernels[integrations]' "
        f"or pip install trl==1.13.0 ({_e})"
    ) from _e

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hero.grpo import AdaptiveKLController, variance_gate
from hero.io import atomic_write_text
from hero_kernels.loss import hero_loss
from hero_kernels.options import HEROLossConfig, loss_option_field

try:  # private helper of TRL (stable across 0.2x-1.x); without it the loss runs outside the wrapper's forward
    from trl.models.utils import _ForwardRedirection
except ImportError:  # pragma: no cover
    _ForwardRedirection = None

__all__ = ["HEROGRPOConfig", "HEROGRPOTrainer", "HERO_STATE_NAME", "LOSS_TYPE_TO_AGG", "TESTED_TRL_VERSION",
           "LOSS_OPTION_NAMES"]

logger = logging.getLogger(__name__)

TESTED_TRL_VERSION = "1.13.0"
#: file written into every checkpoint folder
HERO_STATE_NAME = "hero_trainer_state.json"
#: TRL loss_type -> hero_loss loss_agg
LOSS_TYPE_TO_AGG = {
    "grpo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}
LM_HEAD_PATHS = ("auto", "fused", "logits")
#: hero_kernels loss option -> the HEROGRPOConfig field that sets it (TRL's own names where TRL has the option;
#: max_len is max_completion_length, used by dr_grpo's seq-mean-token-sum-norm)
LOSS_OPTION_NAMES = {"beta": "beta", "eps_low": "epsilon", "eps_high": "epsilon_high", "temperature": "temperature",
                     "kappa": "kappa", "entropy_weighting": "entropy_weighting", "entropy_grad": "entropy_grad",
                     "weight_on": "weight_on", "loss_agg": "loss_agg", "impl": "hero_impl",
                     "max_len": "max_completion_length"}

# multimodal inputs TRL's batch may carry; passed through to the model unchanged (one micro-batch = one chunk)
_MM_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
            "image_position_ids", "token_type_ids", "mm_token_type_ids")


@dataclass
class HEROGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus HERO's options. Every ``GRPOConfig`` field keeps its TRL meaning; ``beta`` is the KL
    coefficient (the initial one when ``kl_target > 0``), ``epsilon`` / ``epsilon_high`` the clip range and
    ``temperature`` the sampling temperature the loss scores."""

    # TRL 1.13 defaults this to True (KL term times the differentiable ratio); HERO's KL term is the plain k3
    use_bias_correction_kl: bool = field(default=False, metadata={
        "help": "Must stay False when beta != 0: HERO's KL term is the plain k3 estimator (no ratio factor)."})
    # HERO loss options: defaults and help texts from hero_kernels.HEROLossConfig (checked by it too)
    kappa: float = loss_option_field("kappa")
    entropy_weighting: bool = loss_option_field("entropy_weighting")
    entropy_grad: bool = loss_option_field("entropy_grad")
    weight_on: str = loss_option_field("weight_on")
    loss_agg: Optional[str] = field(default=None, metadata={
        "help": HEROLossConfig.doc("loss_agg") + " None derives it from loss_type (grpo -> seq-mean-token-mean, "
                "dapo/bnpo -> token-mean, dr_grpo -> seq-mean-token-sum-norm)."})
    variance_gate: bool = field(default=True, metadata={"help": "VG-HNM: drop zero-variance groups and keep the "
                                                                "keep_frac groups with the largest reward variance."})
    keep_frac: float = field(default=0.6, metadata={"help": "Variance gate: fraction of ALL groups kept, in (0, 1]."})
    gate_correct_threshold: float = field(default=0.5, metadata={
        "help": "A completion whose FIRST reward function scores >= this counts as correct (gate/all_correct, "
                "gate/all_wrong logs only)."})
    kl_target: float = field(default=0.0, metadata={"help": "Adaptive KL target per token (> 0 turns on the "
                                                            "Ziegler et al. controller; needs beta > 0)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon in samples."})
    kl_clip: float = field(default=0.2, metadata={"help": "Adaptive KL error clip."})
    hero_impl: str = loss_option_field("impl")
    lm_head_path: str = field(default="auto", metadata={
        "help": "'fused': last hidden states + lm_head weight (no logits); 'logits': full model forward then "
                "hero_loss on the logits; 'auto': fused unless DeepSpeed ZeRO-3 or an MoE aux loss needs logits."})

    def __post_init__(self):
        super().__post_init__()
        _check_hero_args(self)

    @property
    def hero_loss_agg(self) -> str:
        return self.loss_agg if self.loss_agg is not None else LOSS_TYPE_TO_AGG[self.loss_type]

    def hero_loss_config(self, beta: Optional[float] = None, loss_agg: Optional[str] = None) -> HEROLossConfig:
        """The hero_kernels loss options these arguments set (``beta``: the adaptive controller's current value,
        default ``self.beta``; ``loss_agg``: the trainer's, default ``hero_loss_agg``)."""
        agg = loss_agg or self.hero_loss_agg
        return HEROLossConfig(
            beta=float(self.beta if beta is None else beta), eps_low=float(self.epsilon),
            eps_high=float(self.epsilon if self.epsilon_high is None else self.epsilon_high),
            temperature=float(self.temperature), kappa=self.kappa, entropy_weighting=self.entropy_weighting,
            entropy_grad=self.entropy_grad, weight_on=self.weight_on, loss_agg=agg, impl=self.hero_impl,
            max_len=int(self.max_completion_length) if agg == "seq-mean-token-sum-norm" else None)


def _check_hero_args(a: HEROGRPOConfig) -> None:
    """Range / choice checks and the TRL options HERO's loss does not implement; each error names the field."""
    if a.loss_type not in LOSS_TYPE_TO_AGG:
        raise ValueError(f"loss_type={a.loss_type!r} is not supported by HEROGRPOTrainer; use one of "
                         f"{sorted(LOSS_TYPE_TO_AGG)}")
    # every loss option through hero_kernels' own checks (the same ranges as hero_loss), named as TRL names it
    a.hero_loss_config().validate(LOSS_OPTION_NAMES)
    if not 0 < a.keep_frac <= 1:
        raise ValueError(f"keep_frac must be in (0, 1], got {a.keep_frac}")
    if not (math.isfinite(a.kl_target) and a.kl_target >= 0):
        raise ValueError(f"kl_target must be >= 0, got {a.kl_target}")
    if a.kl_target > 0 and a.beta <= 0:
        raise ValueError("kl_target > 0 (adaptive KL) needs beta > 0: the controller scales beta multiplicatively")
    if a.kl_horizon <= 0:
        raise ValueError(f"kl_horizon must be > 0, got {a.kl_horizon}")
    if a.kl_clip <= 0:
        raise ValueError(f"kl_clip must be > 0, got {a.kl_clip}")
    if a.lm_head_path not in LM_HEAD_PATHS:
        raise ValueError(f"lm_head_path must be one of {LM_HEAD_PATHS}, got {a.lm_head_path!r}")
    unsupported = [
        (a.importance_sampling_level != "token", "importance_sampling_level must be 'token'"),
        (a.top_entropy_quantile < 1.0, "top_entropy_quantile < 1 (high-entropy token masking) is not supported"),
        (a.off_policy_mask_threshold is not None, "off_policy_mask_threshold is not supported"),
        (a.delta is not None, "delta (two-sided clipping) is not supported"),
        (bool(a.use_bias_correction_kl) and a.beta != 0.0, "use_bias_correction_kl=True (KL term times the ratio) "
         "is not supported with beta != 0"),
        (a.entropy_coef != 0.0 or bool(a.use_adaptive_entropy),
         "the entropy bonus (entropy_coef / use_adaptive_entropy) is not supported"),
        (bool(a.use_liger_kernel), "use_liger_kernel replaces the loss; HEROGRPOTrainer brings its own fused loss"),
    ]
    for bad, msg in unsupported:
        if bad:
            raise ValueError(f"HEROGRPOConfig: {msg}")


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover
        return False
    return bool(is_deepspeed_zero3_enabled())


class HEROGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``hero_kernels.hero_loss`` (see the module docstring for the override points).

    Takes exactly ``GRPOTrainer``'s arguments; ``args`` must be a ``HEROGRPOConfig``.
    """

    def __init__(self, model, reward_funcs=None, args: Optional[HEROGRPOConfig] = None, *pargs, **kwargs):
        if args is None:
            args = HEROGRPOConfig(output_dir="hero-grpo")
        if not isinstance(args, HEROGRPOConfig):
            raise TypeError(f"args must be a HEROGRPOConfig, got {type(args).__name__}")
        self._hero_rewards_per_func: Optional[torch.Tensor] = None
        self._hero_kl_window: Optional[torch.Tensor] = None
        super().__init__(model, reward_funcs, args, *pargs, **kwargs)
        self.hero_loss_agg = args.hero_loss_agg
        # TRL builds the reference model (and computes ref log-probs) iff beta != 0; the controller only rescales it.
        self.kl_controller = AdaptiveKLController(
            init_beta=float(args.beta), target=args.kl_target or None, horizon=args.kl_horizon, clip=args.kl_clip
        )
        path = args.lm_head_path
        if path == "auto":
            path = "logits" if (_zero3_enabled() or self.aux_loss_enabled) else "fused"
        if path == "fused" and _zero3_enabled():
            raise ValueError(
                "lm_head_path='fused' does not work with DeepSpeed ZeRO-3 (the sharded LM head is gathered only inside "
                "its own forward, and the fused op recomputes with it in backward); use lm_head_path='logits' or "
                "'auto', or ZeRO-2 / FSDP"
            )
        if path == "fused" and self.aux_loss_enabled:
            raise ValueError("the MoE router aux loss needs the full model forward: set lm_head_path='logits' "
                             "(or router_aux_loss_coef=0)")
        self.hero_lm_head_path = path
        self._hero_redirect = _ForwardRedirection() if _ForwardRedirection is not None else None

    # ------------------------------------------------------------------------------------------
    # checkpoint state (adaptive KL coefficient)
    # ------------------------------------------------------------------------------------------
    def hero_state_dict(self) -> Dict[str, Any]:
        return {"version": 1, "kl_controller": self.kl_controller.state_dict()}

    def load_hero_state_dict(self, state: Dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(state["kl_controller"])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), name)
            atomic_write_text(os.path.join(folder, HERO_STATE_NAME), json.dumps(self.hero_state_dict()))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, HERO_STATE_NAME)
        if os.path.exists(path):
            with open(path) as f:
                self.load_hero_state_dict(json.load(f))
        elif self.kl_controller.adaptive:
            logger.warning(f"{checkpoint} has no {HERO_STATE_NAME}: the adaptive KL coefficient restarts from beta = "
                           f"{self.kl_controller.beta}")

    # ------------------------------------------------------------------------------------------
    # batch post-processing: variance gate + global normalizer counts
    # ------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._hero_rewards_per_func = rewards_per_func  # [global completions, n_funcs], gathered over ranks by TRL
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        rpf, self._hero_rewards_per_func = self._hero_rewards_per_func, None
        device = out["completion_ids"].device
        mode = "train" if self.model.training else "eval"
        B = out["completion_ids"].shape[0]
        keep = torch.ones(B, dtype=torch.float32, device=device)
        if mode == "train" and self.args.variance_gate and rpf is not None:
            keep = self._hero_gate(rpf, B).to(device)
            adv = out["advantages"]
            out["advantages"] = adv * keep.view(-1, *([1] * (adv.dim() - 1))).to(adv.dtype)
        out["hero_keep"] = keep
        mask = self._hero_loss_mask(out)
        local = torch.stack([mask.sum(), (mask.sum(1) > 0).sum()]).to(torch.float32)
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        # 0-dim tensors: TRL's shuffle / split keep them whole for every micro-batch of the generation batch
        out["hero_num_tokens"] = total[0].clone()
        out["hero_num_seqs"] = total[1].clone()
        return out

    def _hero_gate(self, rewards_per_func: torch.Tensor, n_local: int) -> torch.Tensor:
        """Keep mask [n_local] float (1 kept / 0 dropped) of this rank's completions; logs gate/* stats."""
        G = self.num_generations
        rpf = rewards_per_func.detach().to(torch.float64).cpu()
        w = self.reward_weights.detach().to(torch.float64).cpu()
        unscorable = torch.isnan(rpf).all(1)
        r = (rpf * w).nansum(1)
        r[unscorable] = math.nan
        groups = r.view(-1, G)
        # an unscorable completion adds no spread: it takes its group's mean (an all-unscorable group -> variance 0)
        gmean = torch.nanmean(groups, dim=1, keepdim=True).nan_to_num(0.0)
        groups = torch.where(torch.isnan(groups), gmean.expand_as(groups), groups)
        first = rpf[:, 0].view(-1, G)
        correct = first >= self.args.gate_correct_threshold  # NaN compares False: unscorable is not correct
        res = variance_gate(groups, keep_frac=self.args.keep_frac, correct=correct)
        kept_groups = torch.zeros(groups.shape[0], dtype=torch.bool)
        kept_groups[res.kept] = True
        keep_global = kept_groups.repeat_interleave(G)
        start = self.accelerator.process_index * n_local
        keep = keep_global[start:start + n_local].to(torch.float32)
        m = self._metrics["train"]
        for k in ("kept_frac", "threshold", "all_correct", "all_wrong", "zero_std"):
            m[f"gate/{k}"].append(float(res.stats[k]))
        return keep

    @staticmethod
    def _hero_loss_mask(inputs) -> torch.Tensor:
        """[B, T] 1 where a completion token enters the loss: completion mask x tool mask x gate."""
        mask = inputs["completion_mask"]
        if inputs.get("tool_mask") is not None:
            mask = mask * inputs["tool_mask"]
        keep = inputs.get("hero_keep")
        if keep is not None:
            mask = mask * keep.view(-1, 1).to(mask.dtype)
        return mask

    # ------------------------------------------------------------------------------------------
    # loss
    # ------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("HEROGRPOTrainer does not support returning outputs")
        if self.hero_lm_head_path == "fused":
            unwrapped = self.accelerator.unwrap_model(model)
            if self._hero_redirect is not None and unwrapped is not model:
                # run inside the wrapper's forward so DDP / FSDP pre-forward hooks and gradient sync behave
                return self._hero_redirect(model, unwrapped, self._hero_compute_loss, unwrapped, inputs)
            return self._hero_compute_loss(unwrapped, inputs)
        return self._hero_compute_loss(model, inputs)

    def _hero_normalizer(self, inputs, mask: torch.Tensor, mode: str) -> torch.Tensor:
        """Denominator D of hero_loss for this micro-batch (see the module docstring)."""
        tokens = self.hero_loss_agg == "token-mean"
        key = "hero_num_tokens" if tokens else "hero_num_seqs"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        if inputs.get(key) is not None:
            d = inputs[key].to(torch.float32) / self.accelerator.num_processes
            if mode == "train":
                d = d * ga / self.args.steps_per_generation
        else:  # a batch that did not come from _generate_and_score_completions: this micro-batch's own count
            d = (mask.sum() if tokens else (mask.sum(1) > 0).sum()).to(torch.float32) * ga
        return d.clamp(min=1.0)  # nothing to train on -> loss 0, never 0/0

    def _hero_compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        T = completion_ids.size(1)
        mode = "train" if self.model.training else "eval"
        mask = self._hero_loss_mask(inputs)
        labels = completion_ids.long().masked_fill(mask == 0, -100)

        advantages = inputs["advantages"]
        is_ratio = inputs.get("importance_sampling_ratio")
        if self.use_vllm and self.vllm_importance_sampling_correction and is_ratio is not None:
            # the ratio is >= 0, so -min(rho A c, clip(rho) A c) = c * pg: scaling A reproduces TRL's product
            A2 = advantages.view(advantages.shape[0], -1) if advantages.dim() > 1 else advantages.unsqueeze(1)
            advantages = (A2 * is_ratio).expand(-1, T).contiguous()

        beta = float(self.kl_controller.beta) if self.beta != 0.0 else 0.0
        opts = dict(
            old_logp=inputs.get("old_per_token_logps"),
            ref_logp=inputs.get("ref_per_token_logps") if beta != 0.0 else None,
            normalizer=self._hero_normalizer(inputs, mask, mode),
            config=self.args.hero_loss_config(beta, self.hero_loss_agg),
        )
        aux_loss = None
        if self.hero_lm_head_path == "fused":
            hidden = self._hero_last_hidden(model, inputs, input_ids, attention_mask, T)
            head = _output_head(model)
            weight, bias = head.weight, getattr(head, "bias", None)
            if hidden.dtype != weight.dtype:  # e.g. cast_lm_head_to_fp32: score in the head's dtype
                hidden = hidden.to(weight.dtype)
            loss, metrics = hero_loss(hidden, labels, advantages, weight=weight, bias=bias, **opts)
        else:
            logits, aux_loss = self._hero_logits(model, inputs, input_ids, attention_mask, T)
            loss, metrics = hero_loss(logits, labels, advantages, **opts)
        if aux_loss is not None:
            ga = self.current_gradient_accumulation_steps if mode == "train" else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / ga
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        self._hero_log(metrics, mode)
        return loss

    def _hero_last_hidden(self, model, inputs, input_ids, attention_mask, T):
        """Completion hidden states [B, T, D] of the backbone (no LM head). Text models: TRL's own
        ``_get_last_hidden_state``. Batches with image inputs: the backbone gets every multimodal input of the
        batch (``_MM_KEYS``), because TRL 1.13's helper drops ``mm_token_type_ids`` / ``token_type_ids``, and
        Qwen2-VL's M-RoPE needs them in transformers 5 (it raises without them)."""
        mm = {k: inputs[k] for k in _MM_KEYS if inputs.get(k) is not None}
        if not mm:
            return self._get_last_hidden_state(model, input_ids, attention_mask, T)
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        backbone = getattr(model, "base_model", model)
        if backbone is model:  # pre-5.0 transformers VLMs: base_model_prefix "" (see TRL's helper)
            backbone = model.model
        out = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **mm)
        return out.last_hidden_state[:, :-1, :][:, -T:, :]  # position t predicts token t + 1

    def _hero_logits(self, model, inputs, input_ids, attention_mask, T):
        """Completion logits [B, T, V] (raw, not divided by temperature) from the full model forward."""
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        for k in _MM_KEYS:
            if inputs.get(k) is not None:
                model_inputs[k] = inputs[k]
        if "logits_to_keep" in self.model_kwarg_keys:
            model_inputs["logits_to_keep"] = T + 1  # the last position predicts past the completion
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        outputs = model(**model_inputs)
        logits = outputs.logits[:, :-1, :][:, -T:, :]
        return logits, (outputs.aux_loss if self.aux_loss_enabled else None)

    # ------------------------------------------------------------------------------------------
    # metrics + adaptive KL
    # ------------------------------------------------------------------------------------------
    def _hero_log(self, m: Dict[str, torch.Tensor], mode: str) -> None:
        """Global (all-rank) metrics: token-weighted means like TRL's ``global_masked_mean``, maxima over ranks."""
        tok, resp = m["tokens"], m["responses"]
        sums = torch.stack([m["entropy/mean"] * tok, tok, m["kl"] * tok, m["clip_ratio/low_mean"] * tok,
                            m["clip_ratio/high_mean"] * tok, m["weights/effective_tokens"] * resp, resp]).float()
        has = tok > 0
        ninf = torch.full((), -math.inf, device=tok.device)
        maxes = torch.stack([torch.where(has, m["weights/max"], ninf), torch.where(has, m["entropy/max"], ninf),
                             torch.where(has, -m["entropy/min"], ninf)]).float()
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
            maxes = self.accelerator.gather(maxes.unsqueeze(0)).view(-1, 3).amax(0)
        s = sums.tolist()
        mx = maxes.tolist()
        ntok, nresp = max(s[1], 1.0), max(s[6], 1.0)
        out = self._metrics[mode]
        out["entropy"].append(s[0] / ntok)
        if s[1] > 0:
            out["entropy/min"].append(-mx[2])
            out["entropy/max"].append(mx[1])
            out["weights/max"].append(mx[0])
        out["weights/effective_tokens"].append(s[5] / nresp)
        if self.beta != 0.0:
            out["kl"].append(s[2] / ntok)
        out["clip_ratio/low_mean"].append(s[3] / ntok)
        out["clip_ratio/high_mean"].append(s[4] / ntok)
        out["clip_ratio/region_mean"].append((s[3] + s[4]) / ntok)
        if mode != "train":
            return
        # adaptive KL: accumulate the optimizer step's window (all micro-batches, all ranks), update at its end
        if self.kl_controller.adaptive:
            w = torch.tensor([s[2], s[1], s[6]], dtype=torch.float64)
            self._hero_kl_window = w if self._hero_kl_window is None else self._hero_kl_window + w
        if self.accelerator.sync_gradients:
            if self.kl_controller.adaptive and self._hero_kl_window is not None:
                kl_sum, ntok_w, nresp_w = self._hero_kl_window.tolist()
                if ntok_w > 0:
                    self.kl_controller.update(kl_sum / ntok_w, int(nresp_w))
                self._hero_kl_window = None
            out["kl_coef"].append(float(self.kl_controller.beta))


def _output_head(model):
    """The LM head module (weight [V, D], optional bias) of a causal LM, PEFT-wrapped or not."""
    base = model
    if hasattr(base, "get_base_model"):  # peft.PeftModel
        base = base.get_base_model()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        head = getattr(base, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"cannot find the LM head of {type(base).__name__} (get_output_embeddings() / lm_head); "
                         "use lm_head_path='logits'")
    if hasattr(head, "base_layer"):  # a PEFT-adapted lm_head: its merged weight is not a plain Parameter
        raise ValueError("the LM head carries a PEFT adapter; use lm_head_path='logits'")
    return head


# ----------------------------------------------------------------------------------------------
# command line: accelerate launch -m hero.integrations.trl --model_name_or_path ... --dataset ...
# ----------------------------------------------------------------------------------------------
@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="", metadata={"help": "Local path or hub id of a causal LM."})
    dataset: str = field(default="", metadata={"help": "A local .jsonl/.json/.parquet/.csv file or a dataset id; "
                                                       "needs a 'prompt' column (or --prompt_field)."})
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompt_field: str = field(default="prompt", metadata={"help": "Column holding the prompt."})
    reward_funcs: List[str] = field(default_factory=lambda: ["yes_no", "format"], metadata={
        "help": "hero.rewards names (yes_no, exact_match, format) or package.module:function."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto | bfloat16 | float16 | float32."})


def main(argv: Optional[List[str]] = None) -> HEROGRPOTrainer:
    """Train with HEROGRPOTrainer from the command line (every HEROGRPOConfig field is a --flag)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

    from hero.rewards import get_reward

    parser = HfArgumentParser((ScriptArguments, HEROGRPOConfig))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    if not script.model_name_or_path or not script.dataset:
        parser.error("--model_name_or_path and --dataset are required")
    ext = os.path.splitext(script.dataset)[1].lstrip(".")
    if os.path.isfile(script.dataset):
        kind = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if kind is None:
            raise ValueError(f"--dataset {script.dataset}: unsupported file type {ext!r} (jsonl, json, parquet, csv)")
        ds = load_dataset(kind, data_files=script.dataset, split="train")
    else:
        ds = load_dataset(script.dataset, split=script.dataset_split)
    if script.prompt_field != "prompt":
        ds = ds.rename_column(script.prompt_field, "prompt")
    dtype = "auto" if script.dtype == "auto" else getattr(torch, script.dtype)
    model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(script.model_name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rewards = [get_reward(n) for n in script.reward_funcs]
    trainer = HEROGRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=ds, processing_class=tok)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


if __name__ == "__main__":  # pragma: no cover
    main()
