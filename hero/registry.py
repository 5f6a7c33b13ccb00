"""Registries that connect the trainer core to the models and datasets an experiment provides.

The core (config, rollout, rewards, grpo, trainer, checkpoint, io, data.jsonl, cli) knows only transformers
models and JSONL files. Anything else, such as the confidence-trap experiment's tiny VLM and its digits-POPE
task, registers itself here when its package is imported::

    from hero.registry import register_dataset, register_model

    @register_dataset("my_task")
    def build(cfg):                    # TrainConfig -> list of row dicts
        ...

    @register_model("my-model")
    def build(mcfg, ctx):              # ModelConfig, BuildContext -> (model, ModelAdapter)
        ...

``PROVIDERS`` maps the names that ship with the repository to the module that registers them, so a config
that says ``data.name: digits_pope`` or ``model.name: tiny-vlm`` imports the experiment on first use and
never before (``import hero.trainer`` does not import any experiment).

Saved models are found by format: ``register_saved_format(kind)`` registers a loader for directories whose
``config.json`` has ``model_type == kind`` or whose ``tokenizer.json`` has ``type == kind``.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

if TYPE_CHECKING:  # torch is not imported here: experiments register without paying for it
    import torch

__all__ = [
    "BuildContext",
    "DATASETS",
    "MODELS",
    "SAVED_FORMATS",
    "PROVIDERS",
    "register_dataset",
    "register_model",
    "register_saved_format",
    "dataset_builder",
    "model_builder",
    "saved_format_loader",
    "dataset_names",
]

_CONFIDENCE_TRAP = "hero.experiments.confidence_trap"

#: what -> name -> module that registers it on import (imported lazily, the first time the name is looked up).
PROVIDERS: Dict[str, Dict[str, str]] = {
    "dataset": {"digits_pope": _CONFIDENCE_TRAP},
    # random-init Llama + the experiment's offline tokenizer; the experiment's tiny vision-language model
    "model": {"tiny-llama": _CONFIDENCE_TRAP, "tiny-vlm": _CONFIDENCE_TRAP},
    # config.json model_type / tokenizer.json type of what those models save
    "saved format": {"hero-tiny-vlm": _CONFIDENCE_TRAP, "hero-tiny-tokenizer": _CONFIDENCE_TRAP},
}


@dataclass
class BuildContext:
    """What a model builder may use besides the ModelConfig."""

    seed: int
    device: torch.device
    attn_implementation: str  # resolved: "sdpa", "eager", "flash_attention_2", ...
    dtype: torch.dtype
    image_field: str = "image"
    sample_row: Optional[dict] = None  # the first dataset row, e.g. to size a vision tower from its image


DatasetBuilder = Callable[[Any], list]
ModelBuilder = Callable[[Any, BuildContext], tuple]

#: dataset name -> ``fn(cfg: TrainConfig) -> list[dict]``
DATASETS: Dict[str, DatasetBuilder] = {}
#: model name -> ``fn(mcfg: ModelConfig, ctx: BuildContext) -> (model, ModelAdapter)``
MODELS: Dict[str, ModelBuilder] = {}
#: saved-format kind -> ``fn(path: str, mcfg: ModelConfig, ctx: BuildContext) -> (model, ModelAdapter)``
SAVED_FORMATS: Dict[str, Callable[[str, Any, BuildContext], tuple]] = {}


def _register(table: Dict[str, Callable], what: str, name: str):  # what: a PROVIDERS key
    def deco(fn):
        if table.get(name) not in (None, fn):
            raise ValueError(f"{what} {name!r} is already registered")
        table[name] = fn
        return fn

    return deco


def register_dataset(name: str):
    """Decorator: ``data.name == name`` builds its rows with ``fn(cfg)``."""
    return _register(DATASETS, "dataset", name)


def register_model(name: str):
    """Decorator: ``model.name == name`` builds ``(model, adapter)`` with ``fn(mcfg, ctx)``."""
    return _register(MODELS, "model", name)


def register_saved_format(kind: str):
    """Decorator: a directory saved in format ``kind`` loads with ``fn(path, mcfg, ctx)``."""
    return _register(SAVED_FORMATS, "saved format", kind)


def _lookup(table: Dict[str, Callable], what: str, name: str) -> Optional[Callable]:
    if name not in table and name in PROVIDERS[what]:
        importlib.import_module(PROVIDERS[what][name])
    return table.get(name)


@register_dataset("jsonl")
def _jsonl(cfg) -> list:
    """``data.path``: one JSON object per line (hero.data.jsonl); images load lazily per row. A line that is not
    a JSON object, lacks a ``data.required_fields`` field or names a missing image is skipped with one warning
    (``on_bad_row: skip``) or stops the run (``stop``)."""
    from hero.data.jsonl import load_jsonl

    d = cfg.data
    if not os.path.isfile(d.path):
        from hero.config import ConfigError

        raise ConfigError(f"data.path {d.path!r}: no such file; give a JSONL file (one JSON object per line)")
    return load_jsonl(d.path, load_images=False, required=list(d.required_fields), image_field=d.image_field,
                      on_bad_line="skip" if cfg.on_bad_row == "skip" else "raise")


def dataset_names() -> list:
    """Every dataset name a config may use (registered or provided lazily), without importing providers."""
    return sorted(set(DATASETS) | set(PROVIDERS["dataset"]))


def dataset_builder(name: str) -> DatasetBuilder:
    fn = _lookup(DATASETS, "dataset", name)
    if fn is None:
        raise ValueError(f"unknown dataset {name!r}; known: {dataset_names()}")
    return fn


def model_builder(name: str) -> Optional[ModelBuilder]:
    """The registered builder for ``name``, or None (then ``name`` is a path or a hub id)."""
    return _lookup(MODELS, "model", name)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def saved_format_loader(path: str) -> Optional[Callable]:
    """The loader registered for the format of directory ``path``, or None (a plain transformers save)."""
    kinds = (_read_json(os.path.join(path, "config.json")).get("model_type"),
             _read_json(os.path.join(path, "tokenizer.json")).get("type"))
    for kind in kinds:
        fn = _lookup(SAVED_FORMATS, "saved format", kind) if isinstance(kind, str) else None
        if fn is not None:
            return fn
    return None
