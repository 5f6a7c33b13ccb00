"""Option dataclasses: ``RowOptions`` (public ops -> backends) and ``HEROLossConfig``, the one declaration of
every HERO loss option (default, range, meaning) that ``hero_loss``, ``HEROLoss``, the trainer's ``LossConfig``
and the TRL / verl integrations derive from."""
from __future__ import annotations

import math
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["RowOptions", "IMPLS", "LOSS_AGGS", "WEIGHT_ON", "LOSS_OPTIONS", "HEROLossConfig", "loss_option_field",
           "check_real"]

#: Accepted values of every public op's ``impl`` argument.
IMPLS = ("auto", "triton", "cuda", "cpu", "torch")
#: ``loss_agg`` of hero_loss: how per-token losses reduce to one scalar (see ``hero_loss``).
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
#: ``weight_on``: which tokens the entropy weights apply to.
WEIGHT_ON = ("all", "negative")


@dataclass(frozen=True)
class RowOptions:
    """Per-row math options shared by every backend.

    temperature: sampling temperature tau > 0; every quantity uses logits / tau.
    ignore_index: label value that masks a row (its outputs are 0 and it gets no gradient).
    """

    temperature: float = 1.0
    ignore_index: int = -100

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"temperature must be a Python float, got {type(t).__name__}")
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {t}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        # Python floats become float64 under Inductor; store a plain float so backends can cast explicitly.
        object.__setattr__(self, "temperature", float(t))

    @property
    def inv_temperature(self) -> float:
        return 1.0 / self.temperature


# ----------------------------------------------------------------------------------------------
# HERO loss options
# ----------------------------------------------------------------------------------------------
def _range_text(lo: float, hi: float, lo_open: bool, nonzero: bool) -> str:
    if nonzero and lo == -math.inf:
        return "finite and non-zero"
    if not math.isfinite(hi):
        return f"finite and {'>' if lo_open else '>='} {lo:g}" + (" and non-zero" if nonzero else "")
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"


def check_real(name: str, v: Any, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
               nonzero: bool = False, tensor: bool = True) -> None:
    """Raise naming ``name`` unless ``v`` is a finite real number in the range (``nonzero``: and != 0).

    A Python number is checked at once. A 0-dim tensor (``tensor=True``) is checked by value too: on the CPU
    like a number (ValueError), on an accelerator (or while torch.compile traces) by an asynchronous device
    assert, so no host sync is added; a bad value then fails at the next synchronization.
    """
    if isinstance(v, Tensor):
        if not tensor:
            raise TypeError(f"{name} must be a Python float, got a tensor")
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{name} given as a tensor must be a real scalar, got {v.dtype} shape {tuple(v.shape)}")
        if v.device.type != "cpu" or torch.compiler.is_compiling():
            ok = torch.isfinite(v) & (v > lo if lo_open else v >= lo) & (v <= hi)
            if nonzero:
                ok = ok & (v != 0)
            torch._assert_async(ok.reshape(()), f"{name} must be {_range_text(lo, hi, lo_open, nonzero)}")
            return
        v = float(v)
    elif isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a Python float{' or a 0-dim tensor' if tensor else ''}, "
                        f"got {type(v).__name__}")
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo) or (nonzero and v == 0):
        raise ValueError(f"{name} must be {_range_text(lo, hi, lo_open, nonzero)}, got {v}")


def _option(default, doc: str, kind: str, **spec) -> Any:
    """A field of HEROLossConfig; ``kind``: real (with lo / hi / lo_open / nonzero / tensor), bool, choice
    (with choices), int (with lo, optional)."""
    return field(default=default, metadata=dict(doc=doc, kind=kind, **spec))


def _check_option(f: Field, v: Any, name: str) -> None:
    """Check value ``v`` of option field ``f``; errors name ``name`` (the caller's spelling of the option)."""
    meta = f.metadata
    kind = meta["kind"]
    if kind == "real":
        check_real(name, v, meta.get("lo", -math.inf), meta.get("hi", math.inf), meta.get("lo_open", False),
                   meta.get("nonzero", False), meta.get("tensor", False))
    elif kind == "bool":
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    elif kind == "choice":
        if v not in meta["choices"]:
            raise ValueError(f"{name} must be one of {meta['choices']}, got {v!r}")
    elif kind == "int":
        if v is None and meta.get("optional"):
            return
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < meta.get("lo", -math.inf):
            raise ValueError(f"{name} must be an int >= {meta['lo']}, got {v}")
    else:  # pragma: no cover - a declaration error
        raise AssertionError(f"unknown option kind {kind!r}")


@dataclass
class HEROLossConfig:
    """Every option of the HERO loss, declared once: default, accepted range and meaning (``.doc(name)``).

    ``hero_loss(..., config=cfg, **overrides)`` and ``HEROLoss(cfg)`` read it; the trainer's ``LossConfig``, TRL's
    ``HEROGRPOConfig`` and verl's ``HEROPolicyLossConfig`` take their defaults, help texts and checks from it
    (``loss_option_field``, ``check``), so every value accepted here is accepted by each of them.

    ``beta``, ``eps_low``, ``eps_high`` and ``kappa`` may be 0-dim tensors (an adaptive value never recompiles
    under torch.compile); their values are checked like numbers (asynchronously on an accelerator). Mutable on
    purpose: an adaptive KL controller may update ``beta`` between steps (or pass ``beta=`` per call); call
    ``validate()`` after changing a field.
    """

    beta: float = _option(0.0, "KL coefficient of the k3 term against ref_logp; >= 0, and > 0 (or any tensor "
                               "value) needs ref_logp.", "real", lo=0.0, tensor=True)
    eps_low: float = _option(0.2, "Clip range below 1: ratios under 1 - eps_low stop the gradient of "
                                  "negative-advantage tokens; in [0, 1].", "real", lo=0.0, hi=1.0, tensor=True)
    eps_high: float = _option(0.2, "Clip range above 1: ratios over 1 + eps_high stop the gradient of "
                                   "positive-advantage tokens; >= 0 (DAPO's clip-higher: 0.28).", "real", lo=0.0,
                              tensor=True)
    temperature: float = _option(1.0, "Sampling temperature; logp and H use logits / temperature; > 0.", "real",
                                 lo=0.0, lo_open=True)
    kappa: float = _option(1.0, "HERO weight temperature, w_i = L_s softmax(-H / kappa)_i within a response; "
                                "finite, non-zero. Smaller |kappa| = sharper, large -> plain GRPO; kappa < 0 "
                                "favours high-entropy tokens (the opposite direction, for ablations).", "real",
                           nonzero=True, tensor=True)
    entropy_weighting: bool = _option(True, "Entropy weights on (HERO) or off (plain GRPO, w = 1).", "bool")
    entropy_grad: bool = _option(False, "Let the gradient flow through H inside the weights (default: the "
                                        "weights are detached coefficients, like advantages).", "bool")
    weight_on: str = _option("all", "'all': weight every token; 'negative': weight only tokens with advantage "
                                    "< 0 (others get w = 1).", "choice", choices=WEIGHT_ON)
    loss_agg: str = _option("seq-mean-token-mean", "Aggregation of per-token losses: 'token-mean' | "
                                                   "'seq-mean-token-mean' (HERO) | 'seq-mean-token-sum-norm' "
                                                   "(Dr. GRPO, divides by max_len).", "choice", choices=LOSS_AGGS)
    impl: str = _option("auto", "Kernel backend of the fused op: 'auto' | 'triton' | 'cuda' | 'cpu' | 'torch'.",
                        "choice", choices=IMPLS)
    max_len: Optional[int] = _option(None, "The constant length L_max of 'seq-mean-token-sum-norm' (default: T "
                                           "of a [B, T] batch; required with seq_ids); >= 1.", "int", lo=1,
                                     optional=True)
    ignore_index: int = _option(-100, "Label value of masked tokens.", "int")

    def __post_init__(self):
        self.validate()

    def validate(self, names: Optional[Mapping[str, str]] = None) -> "HEROLossConfig":
        """Check every option; an error names the option (``names`` maps it to a front end's spelling)."""
        for f in fields(self):
            _check_option(f, getattr(self, f.name), (names or {}).get(f.name, f.name))
        return self

    @classmethod
    def check(cls, name: str, value: Any, label: Optional[str] = None) -> None:
        """Check one option's value (errors name ``label``, default ``name``)."""
        _check_option(_FIELDS[name], value, label or name)

    @staticmethod
    def doc(name: str) -> str:
        """The one-line meaning of option ``name``."""
        return _FIELDS[name].metadata["doc"]

    @staticmethod
    def default(name: str) -> Any:
        return _FIELDS[name].default

    def options(self) -> Dict[str, Any]:
        """{name: value} of every option (what hero_loss reads)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def resolve(cls, config: Optional["HEROLossConfig"], overrides: Mapping[str, Any],
                caller: str = "hero_loss") -> "HEROLossConfig":
        """``config`` (default: all defaults) with ``overrides`` applied, validated. Unknown keys raise TypeError."""
        unknown = [k for k in overrides if k not in _FIELDS]
        if unknown:
            raise TypeError(f"{caller}() got unknown option(s) {', '.join(map(repr, unknown))}; loss options are "
                            f"{', '.join(_FIELDS)}")
        if config is None:
            return cls(**overrides)
        if not isinstance(config, HEROLossConfig):
            raise TypeError(f"config must be a HEROLossConfig, got {type(config).__name__}")
        return replace(config, **overrides) if overrides else config.validate()


_FIELDS: Dict[str, Field] = {f.name: f for f in fields(HEROLossConfig)}
#: names of every loss option, in declaration order
LOSS_OPTIONS: Tuple[str, ...] = tuple(_FIELDS)


def loss_option_field(name: str, help_key: str = "help", **extra_meta) -> Any:
    """A dataclass field for a front end's copy of loss option ``name``: the core's default and its meaning as
    ``metadata[help_key]`` (what HfArgumentParser shows). Check values with ``HEROLossConfig.check``."""
    return field(default=_FIELDS[name].default, metadata={help_key: _FIELDS[name].metadata["doc"], **extra_meta})
