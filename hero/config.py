"""Trainer configuration: one dataclass tree, loadable from YAML, overridable from the command line.

``TrainConfig`` holds the run-level fields (lr, steps, batch_size, ...) and one sub-dataclass per concern
(``model``, ``data``, ``generation``, ``rewards``, ``advantages``, ``gate``, ``kl``, ``loss``). Every field has a
comment saying what it does; the YAML file and the CLI use the same names, nested with dots::

    hero train --config configs/tiny.yaml --lr 1e-5 --loss.kappa 0.5 --gate.keep_frac=0.8

Values are typed by the dataclass field types (``int``, ``float``, ``bool``, ``str``, ``list[...]``): strings
from YAML or the CLI are converted ("1e-5" is a float even though YAML 1.1 reads it as a string); a key that
is not a field raises ``ConfigError`` naming the full dotted key; a value that does not convert raises naming
the key and the expected type. ``validate()`` checks ranges and choices (also naming the field).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from hero.errors import HeroUserError
from hero.registry import dataset_names
from hero_kernels.options import HEROLossConfig, loss_option_field

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "GenerationConfig",
    "RewardConfig",
    "AdvantageConfig",
    "GateConfig",
    "KLConfig",
    "LossConfig",
    "CaptionJudgeConfig",
    "OmnexConfig",
    "LOSS_OPTION_KEYS",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "load_config",
    "parse_override_args",
    "update_from_dict",
    "set_dotted",
    "RESUMABLE_KEYS",
    "config_diff",
]


class ConfigError(HeroUserError, ValueError):
    """A bad configuration key or value; the message names the dotted key (``hero`` exits with code 2)."""


@dataclass
class ModelConfig:
    # A model registered in hero.registry, or a local HF path / hub id: a causal LM or an image-text-to-text
    # model (AutoModelForImageTextToText + AutoProcessor: Qwen2-VL / Qwen2.5-VL, LLaVA, LLaVA-NeXT, ...).
    # Registered by the confidence-trap experiment: "tiny-llama" (random-init LlamaForCausalLM built from the
    # sizes below + an offline word-level tokenizer) and "tiny-vlm" (its random-init vision-language model).
    name: str = "tiny-llama"
    # tiny-llama / tiny-vlm only: transformer width.
    hidden_size: int = 64
    # tiny-llama / tiny-vlm only: number of decoder layers.
    num_layers: int = 2
    # tiny-llama / tiny-vlm only: attention heads.
    num_heads: int = 4
    # tiny-llama / tiny-vlm only: MLP width.
    intermediate_size: int = 128
    # tiny-llama only: LM-head rows; 0 = the offline tokenizer's size. Larger pads the vocabulary (e.g. to see
    # the loss cost of a 32k vocab); sampled padding ids decode to nothing.
    vocab_size: int = 0
    # Parameter dtype: "float32" or "bfloat16" (bf16 also works on CPU for the torch backends).
    dtype: str = "float32"
    # "auto": flash_attention_2 when flash_attn is importable and the device is CUDA, else "sdpa";
    # or any transformers attn_implementation ("sdpa", "eager", "flash_attention_2").
    attn_implementation: str = "auto"
    # Recompute decoder activations in backward (transformers' gradient checkpointing): less memory, ~30% slower.
    gradient_checkpointing: bool = False
    # Long chain-of-thought: a forward/backward whose longest completion has at least this many tokens runs with
    # gradient checkpointing even when gradient_checkpointing is false (0 = never switched on automatically).
    gradient_checkpointing_min_len: int = 2048
    # Padding-free policy / reference forward: a micro-batch's rows concatenated into one sequence with
    # position ids restarting per row (no pad tokens through the decoder; same loss and gradients). "auto" =
    # on for text causal LMs and LLaVA / LLaVA-NeXT / Idefics3 / Qwen2-VL / Qwen2.5-VL with eager / sdpa /
    # flash_attention_2 attention, off otherwise (other VLMs: positions or masks not checked); with eager / sdpa
    # (a [T, T] mask over the packed T tokens) only for micro-batches where T^2 <= rows x padded width^2;
    # "on" = always (fail when unsupported); "off".
    packing: str = "auto"
    # Vision-language models: keep the vision encoder frozen (the projector and the language model train).
    freeze_vision: bool = True
    # Vision-language models: image size cap in pixels (H x W) passed to the processor; larger images are
    # downscaled first, keeping their aspect ratio. 0 = the processor's own limit.
    max_pixels: int = 0
    # Reference model for the KL term: "" = a frozen copy of the initial policy (saved in checkpoints);
    # otherwise a path / id loaded like ``name``. Only built when the KL term is on (kl.beta > 0).
    ref_model: str = ""


@dataclass
class DataConfig:
    # "jsonl" (hero.data.jsonl rows from ``path``) or a dataset registered in hero.registry, e.g. "digits_pope"
    # (the confidence-trap experiment's task, built offline).
    name: str = "digits_pope"
    # JSONL file for name="jsonl".
    path: str = ""
    # Prompt text: a str.format template over the row's fields.
    prompt_template: str = "{question}"
    # Fields every row must have (rows without them are bad rows, see TrainConfig.on_bad_row).
    required_fields: List[str] = field(default_factory=lambda: ["question", "answer"])
    # Field holding the image for a vision-language model ("" = text-only: images are ignored).
    image_field: str = "image"
    # digits_pope: examples per POPE split (random / popular / adversarial).
    n_per_split: int = 64
    # digits_pope: Gaussian pixel-noise std on the 0..255 scale.
    sigma: float = 0.0
    # digits_pope: which splits to train on.
    splits: List[str] = field(default_factory=lambda: ["random", "popular", "adversarial"])
    # Reshuffle the rows every epoch (a deterministic permutation from seed + epoch, so resume is exact).
    shuffle: bool = True


@dataclass
class GenerationConfig:
    # G: sampled completions per prompt (a GRPO group); >= 2 (the group std needs two samples).
    num_generations: int = 4
    # Completion length cap; a completion without EOS by then is "clipped" (completions/clipped_ratio).
    max_new_tokens: int = 32
    # Sampling temperature; the loss uses the same value (log-probs of the distribution actually sampled).
    temperature: float = 1.0
    # Nucleus sampling (1.0 = off). Note: the loss scores the full tempered softmax, not the truncated one.
    top_p: float = 1.0
    # Top-k sampling (0 = off). Same caveat as top_p.
    top_k: int = 0


@dataclass
class RewardConfig:
    # Reward functions, summed with ``weights``: names from hero.rewards.REWARDS ("yes_no", "exact_match",
    # "format", "nli") or "package.module:function". The FIRST one defines correctness for the gate's
    # all-correct / all-wrong counts.
    funcs: List[str] = field(default_factory=lambda: ["yes_no", "format"])
    # One weight per function; empty = all 1.0.
    weights: List[float] = field(default_factory=list)
    # A first-reward value >= this counts as "correct" (gate/all_correct, gate/all_wrong).
    correct_threshold: float = 0.5
    # nli reward: local path / id of an AutoModelForSequenceClassification NLI model (+ its tokenizer).
    nli_model: str = ""
    # nli reward: row field holding the reference description (the premise).
    nli_reference_field: str = "description"
    # nli reward: "mean" or "min" of P(entail) - P(contradict) over the response's sentences.
    nli_reduce: str = "mean"


@dataclass
class AdvantageConfig:
    # A = (r - mean_group) / (std + eps); "group": std of the group, "batch": std of the whole batch,
    # "none": A = r - mean_group (Dr. GRPO). std is Bessel-corrected (ddof=1), as in TRL.
    scale: str = "group"
    # eps added to the std (TRL's 1e-4).
    eps: float = 1e-4


@dataclass
class GateConfig:
    # Variance gate (VG-HNM): drop zero-variance groups, keep the top keep_frac of groups by reward variance.
    # False = plain GRPO (every group trains, zero-variance ones only through the KL term).
    enabled: bool = True
    # Fraction of ALL groups in the batch to keep, ceil(keep_frac * n_groups), capped at the number of
    # non-zero-variance groups; in (0, 1].
    keep_frac: float = 0.6
    # Difficulty counts logged per step (gate/easy, gate/medium, gate/hard), from each group's total reward:
    # medium = population variance > medium_variance; of the rest, easy = mean >= easy_mean, hard = the others.
    medium_variance: float = 0.05
    easy_mean: float = 0.5


@dataclass
class KLConfig:
    # Initial KL coefficient beta on the k3 KL term (0 = no KL term, no reference model).
    beta: float = 0.0
    # Dynamic balancer: target KL per token; > 0 turns on the adaptive controller (Ziegler et al. 2019)
    # e = clip(KL/target - 1, -clip, clip), beta <- beta * (1 + e * n / horizon). 0 = fixed beta.
    target: float = 0.0
    # Adaptive controller horizon (in samples; n = completions per step).
    horizon: int = 10000
    # Adaptive controller error clip.
    clip: float = 0.2


#: LossConfig fields that are hero_kernels loss options (same name); the other three come from kl.beta,
#: generation.temperature and generation.max_new_tokens (``LossConfig.hero_loss_config``).
LOSS_OPTION_KEYS = ("kappa", "entropy_weighting", "entropy_grad", "weight_on", "loss_agg", "eps_low", "eps_high", "impl")


@dataclass
class LossConfig:
    # HERO loss options: defaults, accepted values and meaning come from hero_kernels.HEROLossConfig
    # (``HEROLossConfig.doc("kappa")``): kappa (weight temperature; < 0 favours high-entropy tokens),
    # entropy_weighting, entropy_grad, weight_on ("all" | "negative"), loss_agg ("token-mean" |
    # "seq-mean-token-mean" | "seq-mean-token-sum-norm", the last divides by generation.max_new_tokens),
    # eps_low / eps_high (clip range; DAPO's clip-higher uses eps_high 0.28), impl (kernel backend).
    kappa: float = loss_option_field("kappa")
    entropy_weighting: bool = loss_option_field("entropy_weighting")
    entropy_grad: bool = loss_option_field("entropy_grad")
    weight_on: str = loss_option_field("weight_on")
    loss_agg: str = loss_option_field("loss_agg")
    eps_low: float = loss_option_field("eps_low")
    eps_high: float = loss_option_field("eps_high")
    impl: str = loss_option_field("impl")
    # How the loss sees the LM head: "fused" (last hidden states + lm_head weight: no [tokens x vocab] logits),
    # "logits" (materialized logits into hero_loss; for comparison), "reference" (materialized logits into the
    # float64 reference from hero_kernels.reference; tests only, slow).
    path: str = "fused"

    def hero_loss_config(self, beta: float, temperature: float, max_len: int) -> HEROLossConfig:
        """The hero_kernels options of this run (beta = kl.beta or the controller's current value,
        temperature = generation.temperature, max_len = generation.max_new_tokens); validated."""
        return HEROLossConfig(beta=beta, temperature=temperature, max_len=max_len,
                              **{k: getattr(self, k) for k in LOSS_OPTION_KEYS})


@dataclass
class CaptionJudgeConfig:
    # Reward "caption" (hero.omnex.caption): local path of a text-only transformers causal LM that answers the
    # row's question from the response's <caption> alone (no image); required when rewards.funcs has "caption".
    model: str = ""
    # Judge prompt with {caption} and {question} placeholders; "" = hero.omnex.caption.DEFAULT_PROMPT.
    prompt: str = ""
    # Greedy tokens the judge generates (its answer is the first line).
    max_new_tokens: int = 8
    # Judge prompts per generate call.
    batch_size: int = 16


@dataclass
class OmnexConfig:
    # NTK-conflict regularizer (hero.omnex.ntk): weight lambda of the InfoNCE loss over the sketched last-layer
    # log-prob gradients of the kept completions, added to the HERO loss; 0 = off. The other OMNEX modules are
    # switched elsewhere: rewards.funcs "caption" / "omnex_format", variance selection gate.keep_frac (0.5).
    ntk_weight: float = 0.0
    # Similarity threshold tau: j is a positive of i when cos(f_i, f_j) < tau (0.54 in the paper).
    tau: float = 0.54
    # Sketch sizes: k1 rows of the vocabulary projection, k2 columns of the hidden-side projection.
    k1: int = 128
    k2: int = 128
    # Seed of the fixed Gaussian sketch matrices.
    seed: int = 0
    # Which pairs count: "group" (completions of the same prompt) or "batch" (every pair of a micro-batch).
    # Pairs never cross micro-batches: make micro_batch_size a multiple of generation.num_generations.
    pairs: str = "group"


@dataclass
class TrainConfig:
    # Policy model (and reference model) construction.
    model: ModelConfig = field(default_factory=ModelConfig)
    # Dataset and prompt template.
    data: DataConfig = field(default_factory=DataConfig)
    # Sampling of the G completions per prompt.
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # Reward functions and their weights.
    rewards: RewardConfig = field(default_factory=RewardConfig)
    # Group-advantage normalization.
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    # Variance gate (VG-HNM) on groups.
    gate: GateConfig = field(default_factory=GateConfig)
    # KL term and the adaptive KL controller (dynamic balancer).
    kl: KLConfig = field(default_factory=KLConfig)
    # HERO loss options (entropy weights, clipping, aggregation, kernel backend).
    loss: LossConfig = field(default_factory=LossConfig)
    # Judge of the "caption" reward (OMNEX-VL).
    caption_judge: CaptionJudgeConfig = field(default_factory=CaptionJudgeConfig)
    # OMNEX-VL grounding modules wired into the step (the NTK-conflict regularizer).
    omnex: OmnexConfig = field(default_factory=OmnexConfig)
    # Training steps to run (total, including steps done before a resume). One step = one rollout batch and
    # num_iterations optimizer updates on it.
    steps: int = 10
    # Prompts per step (each gets generation.num_generations completions).
    batch_size: int = 4
    # Completions per forward/backward pass (gradient accumulation inside a step); 0 = all at once.
    micro_batch_size: int = 0
    # Token budget per forward/backward pass: the kept completions are sorted by length and grouped so that
    # rows x (prompt + longest completion) <= micro_batch_tokens (with model.packing on: the sum of the rows'
    # unpadded prompt + completion lengths), a longer single completion runs alone; so one long chain of
    # thought does not force small batches on the short ones. 0 = off; with micro_batch_size > 0 both caps apply.
    micro_batch_tokens: int = 0
    # Optimizer passes over each rollout (PPO epochs); > 1 computes old log-probs once, without grad.
    num_iterations: int = 1
    # AdamW learning rate.
    lr: float = 1e-5
    # AdamW weight decay.
    weight_decay: float = 0.0
    # AdamW beta1 (first-moment decay).
    adam_beta1: float = 0.9
    # AdamW beta2 (second-moment decay).
    adam_beta2: float = 0.999
    # Gradient-norm clip (0 = off).
    max_grad_norm: float = 1.0
    # "constant" | "linear" (decay to 0 at `steps`) | "cosine"; all after `warmup_steps` of linear warmup.
    lr_schedule: str = "constant"
    # Linear warmup steps.
    warmup_steps: int = 0
    # Seed for model init, data order and sampling.
    seed: int = 0
    # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # bf16 autocast for the forward passes (CUDA; on CPU autocast bf16 is used where the ops support it).
    bf16: bool = False
    # Where logs (metrics.jsonl, TensorBoard) and checkpoints go.
    output_dir: str = "runs/hero"
    # Save a checkpoint every N steps (0 = only at the end).
    save_steps: int = 0
    # Keep at most this many checkpoints (oldest deleted first; 0 = keep all).
    save_total_limit: int = 2
    # "" = start fresh (refused when output_dir holds checkpoints, see ``overwrite``); "auto" = latest checkpoint
    # in output_dir (fresh if none); or a checkpoint directory.
    resume: str = ""
    # A fresh run into an output_dir that holds another run's checkpoints deletes that run's files (checkpoints,
    # metrics.jsonl, final/, tb/) first instead of refusing.
    overwrite: bool = False
    # Resume even when a run-defining key (anything not in RESUMABLE_KEYS: lr, batch_size, loss.*, model, seed,
    # data, ...) differs from the checkpoint's config; the new values win.
    allow_config_change: bool = False
    # After training, save_pretrained the policy (+ tokenizer) into <output_dir>/final (atomically).
    export: bool = True
    # Also write TensorBoard events when torch.utils.tensorboard is importable.
    tensorboard: bool = False
    # Show a tqdm progress bar.
    progress: bool = True
    # A row missing required fields, with an image that does not load, or whose reward is NaN:
    # "skip" (warn naming the row, go on without it) or "stop" (raise BadRowError naming the row;
    # checkpoints already written stay intact).
    on_bad_row: str = "skip"

    def validate(self) -> "TrainConfig":
        """Check ranges and choices; raise ConfigError naming the field. Returns self."""
        _choice("model.dtype", self.model.dtype, ("float32", "bfloat16"))
        _choice("model.packing", self.model.packing, ("auto", "on", "off"))
        _choice("data.name", self.data.name, dataset_names())
        if self.data.name == "jsonl" and not self.data.path:
            raise ConfigError("data.path must be set when data.name is 'jsonl'")
        if self.data.name != "jsonl" and self.data.path:
            raise ConfigError(f"data.path is set but data.name is {self.data.name!r}, which does not read it; "
                              "add --data.name jsonl to train on the file (or drop data.path)")
        _positive("data.n_per_split", self.data.n_per_split)
        if self.generation.num_generations < 2:
            raise ConfigError(
                f"generation.num_generations must be >= 2 (a group std needs two samples), got {self.generation.num_generations}"
            )
        _positive("generation.max_new_tokens", self.generation.max_new_tokens)
        _loss_option("generation.temperature", "temperature", self.generation.temperature)
        if not 0 < self.generation.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {self.generation.top_p}")
        if self.generation.top_k < 0:
            raise ConfigError(f"generation.top_k must be >= 0, got {self.generation.top_k}")
        if not self.rewards.funcs:
            raise ConfigError("rewards.funcs must name at least one reward function")
        if self.rewards.weights and len(self.rewards.weights) != len(self.rewards.funcs):
            raise ConfigError(
                f"rewards.weights has {len(self.rewards.weights)} entries but rewards.funcs has {len(self.rewards.funcs)}"
            )
        _choice("rewards.nli_reduce", self.rewards.nli_reduce, ("mean", "min"))
        self._validate_omnex()
        _choice("advantages.scale", self.advantages.scale, ("group", "batch", "none"))
        if self.advantages.eps < 0:
            raise ConfigError(f"advantages.eps must be >= 0, got {self.advantages.eps}")
        if not 0 < self.gate.keep_frac <= 1:
            raise ConfigError(f"gate.keep_frac must be in (0, 1], got {self.gate.keep_frac}")
        _loss_option("kl.beta", "beta", self.kl.beta)
        if self.kl.target < 0:
            raise ConfigError(f"kl.target must be >= 0, got {self.kl.target}")
        if self.kl.target > 0 and self.kl.beta == 0:
            raise ConfigError("kl.target > 0 (adaptive KL) needs kl.beta > 0: the controller scales beta multiplicatively")
        _positive("kl.horizon", self.kl.horizon)
        if self.kl.clip <= 0:
            raise ConfigError(f"kl.clip must be > 0, got {self.kl.clip}")
        for k in LOSS_OPTION_KEYS:
            _loss_option(f"loss.{k}", k, getattr(self.loss, k))
        _choice("loss.path", self.loss.path, ("fused", "logits", "reference"))
        if self.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {self.steps}")
        _positive("batch_size", self.batch_size)
        for key, value in (("micro_batch_size", self.micro_batch_size), ("micro_batch_tokens", self.micro_batch_tokens),
                           ("model.gradient_checkpointing_min_len", self.model.gradient_checkpointing_min_len),
                           ("model.max_pixels", self.model.max_pixels)):
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        _positive("num_iterations", self.num_iterations)
        _positive("lr", self.lr)
        _choice("lr_schedule", self.lr_schedule, ("constant", "linear", "cosine"))
        if self.warmup_steps < 0 or self.save_steps < 0 or self.save_total_limit < 0:
            raise ConfigError("warmup_steps, save_steps and save_total_limit must be >= 0")
        if self.max_grad_norm < 0:
            raise ConfigError(f"max_grad_norm must be >= 0, got {self.max_grad_norm}")
        _choice("on_bad_row", self.on_bad_row, ("skip", "stop"))
        if self.overwrite and self.resume:
            raise ConfigError(f"overwrite deletes the run that resume={self.resume!r} would continue; give one of them")
        return self

    def _validate_omnex(self) -> None:
        """Reward names, the caption judge, the gate's difficulty thresholds and the omnex section."""
        from hero.rewards import unknown_reward

        for name in self.rewards.funcs:
            problem = unknown_reward(name)
            if problem:
                raise ConfigError(f"rewards.funcs: {problem}")
        if "caption" in self.rewards.funcs and not self.caption_judge.model:
            raise ConfigError("rewards.funcs has 'caption' but caption_judge.model is empty; set it to a local path "
                              "of a text-only causal LM (--caption_judge.model PATH)")
        if self.caption_judge.prompt and not all(p in self.caption_judge.prompt for p in ("{caption}", "{question}")):
            raise ConfigError("caption_judge.prompt must contain the placeholders {caption} and {question}")
        _positive("caption_judge.max_new_tokens", self.caption_judge.max_new_tokens)
        _positive("caption_judge.batch_size", self.caption_judge.batch_size)
        if not (self.gate.medium_variance >= 0 and math.isfinite(self.gate.medium_variance)):
            raise ConfigError(f"gate.medium_variance must be finite and >= 0, got {self.gate.medium_variance}")
        if not math.isfinite(self.gate.easy_mean):
            raise ConfigError(f"gate.easy_mean must be finite, got {self.gate.easy_mean}")
        om = self.omnex
        if not (om.ntk_weight >= 0 and math.isfinite(om.ntk_weight)):
            raise ConfigError(f"omnex.ntk_weight must be finite and >= 0 (0 = off), got {om.ntk_weight}")
        if not -1 <= om.tau <= 1:
            raise ConfigError(f"omnex.tau is a cosine-similarity threshold in [-1, 1], got {om.tau}")
        _positive("omnex.k1", om.k1)
        _positive("omnex.k2", om.k2)
        _choice("omnex.pairs", om.pairs, ("group", "batch"))


def _loss_option(key: str, name: str, value) -> None:
    """hero_kernels' own check of loss option ``name`` (one range for every front end), as a ConfigError."""
    try:
        HEROLossConfig.check(name, value, key)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {tuple(choices)}, got {value!r}")


def _positive(key: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be > 0, got {value!r}")


# ----------------------------------------------------------------------------------------------
# typed conversion
# ----------------------------------------------------------------------------------------------
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the field type ``tp``; ConfigError names ``key``."""
    if tp is Any:
        return copy.deepcopy(value)
    origin = typing.get_origin(tp)
    if origin in (dict, Dict):  # a free-form section: checked by whoever reads it
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List):
        (elem,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                import yaml

                value = yaml.safe_load(s)
            else:
                value = [v.strip() for v in s.split(",") if v.strip()] if s else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"{key} must be {name}, got {value!r}") from None
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def update_from_dict(obj, d: Dict[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass ``obj`` from nested dict ``d`` (typed by the field annotations); unknown keys raise
    ConfigError naming the dotted key. Used for TrainConfig and for any other config dataclass (the demo's)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key {key!r} (known at this level: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            update_from_dict(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def config_from_dict(d: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """TrainConfig from a nested dict (e.g. parsed YAML); unknown keys raise ConfigError naming the key."""
    cfg = TrainConfig()
    update_from_dict(cfg, d or {})
    return cfg


def config_to_dict(cfg) -> Dict[str, Any]:
    """Nested plain dict (YAML/JSON-serializable)."""
    return dataclasses.asdict(cfg)


def _scalar(raw: Any) -> Any:
    """A command-line value for a free-form (dict) field: "64" -> 64, "2e-3" -> 0.002, anything else as is."""
    if not isinstance(raw, str):
        return raw
    for tp in (int, float):
        try:
            return tp(raw)
        except ValueError:
            pass
    return raw


def set_dotted(cfg, key: str, raw: Any) -> None:
    """Set dotted ``key`` of config dataclass ``cfg`` from a raw value (typed by the field annotation). A key
    that continues into a dict-typed field sets that nested dict entry (``rl.loss.kappa``)."""
    parts = key.split(".")
    obj = cfg
    for i, p in enumerate(parts):
        names = {f.name for f in dataclasses.fields(obj)}
        # accept dashes on the command line: --max-new-tokens == --max_new_tokens
        if p not in names and p.replace("-", "_") in names:
            p = p.replace("-", "_")
        dotted = ".".join(parts[: i + 1])
        if p not in names:
            raise ConfigError(f"unknown config key {dotted!r} (known at this level: {', '.join(sorted(names))})")
        cur = getattr(obj, p)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(cur):
                raise ConfigError(f"{dotted!r} is a section; set one of its fields, e.g. --{dotted}.<field> VALUE")
            setattr(obj, p, _coerce(raw, _hints(type(obj))[p], dotted))
        elif isinstance(cur, dict):
            _set_in_dict(cur, parts[i + 1 :], _scalar(raw), dotted)
            return
        elif dataclasses.is_dataclass(cur):
            obj = cur
        else:
            raise ConfigError(f"{dotted!r} is not a section (cannot set {key!r})")


def _set_in_dict(d: Dict[str, Any], parts: Sequence[str], value: Any, prefix: str) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        prefix = f"{prefix}.{p}"
        if not isinstance(d, dict):
            raise ConfigError(f"{prefix!r} is not a section")
    d[parts[-1]] = value


def parse_override_args(args: Sequence[str]) -> List[tuple]:
    """``["--lr", "1e-5", "--loss.kappa=0.5", "--progress"]`` -> [("lr", "1e-5"), ("loss.kappa", "0.5"), ...].

    A flag with no value (followed by another ``--flag`` or nothing) means "true" (for bool fields).
    """
    out = []
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ConfigError(f"expected --key value, got {a!r}")
        body = a[2:]
        if "=" in body:
            k, v = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2 and not _is_number(args[i + 1])):
            k, v = body, args[i + 1]
            i += 2
        else:
            k, v = body, "true"
            i += 1
        out.append((k, v))
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def apply_overrides(cfg: TrainConfig, overrides: Sequence) -> TrainConfig:
    """Apply CLI overrides: a list of ``--key value`` strings or of (dotted_key, raw_value) pairs."""
    pairs = parse_override_args(overrides) if overrides and isinstance(overrides[0], str) else list(overrides)
    for k, v in pairs:
        set_dotted(cfg, k, v)
    return cfg


def _read_yaml(path: str) -> Dict[str, Any]:
    """The YAML mapping in ``path``; ConfigError (one line: file, line, column, what) when it does not parse."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{where}: malformed YAML ({what}); fix the file (indentation, a missing ':' or quote)") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    return d


def load_config(path: Optional[str] = None, overrides: Sequence = ()) -> TrainConfig:
    """YAML file (optional) + CLI overrides -> validated TrainConfig."""
    d: Dict[str, Any] = _read_yaml(path) if path else {}
    cfg = config_from_dict(d)
    apply_overrides(cfg, overrides)
    return cfg.validate()


# ----------------------------------------------------------------------------------------------
# resume: which keys may change
# ----------------------------------------------------------------------------------------------
#: Dotted keys (or whole sections, ending in ".") a resumed run may change freely: how long to run, logging,
#: checkpoint cadence, output options and how the same math is executed (device, kernel backend, memory
#: trade-offs). Every other key defines the run; changing it on resume needs ``allow_config_change``.
RESUMABLE_KEYS = (
    "steps", "save_steps", "save_total_limit", "resume", "overwrite", "allow_config_change", "export",
    "tensorboard", "progress", "output_dir", "on_bad_row", "device", "micro_batch_size", "loss.impl",
    "model.attn_implementation", "model.gradient_checkpointing", "model.packing",
)


def _flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: Dict[str, Any], new: Dict[str, Any], ignore: Sequence[str] = RESUMABLE_KEYS) -> List[str]:
    """``["lr 0.001 -> 0.01", ...]``: the run-defining keys (not in ``ignore``) whose values differ between two
    ``config_to_dict`` dicts; a key missing on one side (a config from an older version) is not a change."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(set(a) & set(b)):
        if key in ignore or any(key.startswith(p) for p in ignore if p.endswith(".")):
            continue
        if a[key] != b[key]:
            changes.append(f"{key} {a[key]!r} -> {b[key]!r}")
    return changes
