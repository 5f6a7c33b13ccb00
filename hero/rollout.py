"""Model adapters and the rollout helpers of the trainer.

A model family plugs into the trainer through an adapter (``ModelAdapter``): how to turn dataset rows into
left-padded prompt tensors, how to sample completions (with a KV cache), how to get the LAST HIDDEN STATES
of a sequence without computing logits, where the LM head is, and how to decode. ``CausalLMAdapter`` serves
any transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) with a transformers tokenizer;
hidden states come from the base model (``model.get_decoder()`` / ``model.model``), never from
``model(...).logits``. Other model families register a builder in ``hero.registry`` (the confidence-trap
experiment registers its tiny VLM and offline tokenizer there), and ``build_policy`` looks it up.

Sequence layout shared with the trainer: ``[left-padded prompt (P) | completion (C, right-padded)]``. Hidden
state ``t`` predicts token ``t + 1``, so the completion tokens ``P .. P+C-1`` are scored from the hidden
states ``P-1 .. P+C-2`` (``completion_hidden``); the prompt positions never reach the LM head.

Padding-free (packed) layout (``pack_rows``, ``model.packing``): the attended tokens of m rows concatenated
into ONE sequence ``[1, T]`` with ``position_ids`` restarting at 0 per row and no attention mask. transformers
(>= 4.53, ``masking_utils.find_packed_sequence_indices``) reads the row boundaries off the position ids: a
block-diagonal causal mask for eager / sdpa, ``flash_attn_varlen_func`` for flash_attention_2. The positions
equal the padded layout's (``cumsum(attention_mask) - 1``), so both layouts give the same hidden states.
Adapters opt in with ``packed_hidden_states`` / ``packing_unsupported``; ``hero.models.hf_vlm`` packs the VLM
families where it is exact (1-D positions over the image-expanded sequence, or Qwen2-VL's M-RoPE ids per row).
"""
from __future__ import annotations

import copy
import importlib.util
import os
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from hero.errors import HeroUserError
from hero.registry import BuildContext, model_builder, saved_format_loader

__all__ = [
    "IGNORE_INDEX",
    "BadRowError",
    "ModelAdapter",
    "CausalLMAdapter",
    "completion_mask_from_eos",
    "completion_labels",
    "completion_hidden",
    "PackedRows",
    "pack_rows",
    "PACKING_ATTENTION",
    "packing_attention_unsupported",
    "resolve_attn_implementation",
    "build_policy",
    "build_tiny_llama",
    "load_causal_lm",
]


#: Label of a position that is not scored (after a completion's eos); hero_kernels' default ignore_index.
IGNORE_INDEX = -100


class BadRowError(HeroUserError, ValueError):
    """A dataset row that cannot be used (missing field, image that does not load, NaN reward).

    ``row_id`` is the row's ``id`` field when it has one, else ``index=<position in the dataset>``.
    Fatal only with ``on_bad_row: stop`` (``hero train`` then exits with code 3)."""

    exit_code = 3

    def __init__(self, message: str, row_id: str = ""):
        super().__init__(message)
        self.row_id = row_id


def row_name(row: Any, index: int) -> str:
    """How messages name a row: ``id='...' (index 12)`` or ``index 12``."""
    rid = row.get("id") if isinstance(row, dict) else None
    return f"id={rid!r} (index {index})" if rid is not None else f"index {index}"


def completion_mask_from_eos(ids: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """[N, C] -> long mask, 1 up to and including the first eos of each row (pad == eos is fine)."""
    eos = torch.as_tensor(list(eos_ids), device=ids.device)
    is_eos = torch.isin(ids, eos).long()
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).long()


def completion_labels(ids: Tensor, mask: Tensor) -> Tensor:
    """Completion ids [N, C] -> labels [N, C]: the token where mask == 1, IGNORE_INDEX elsewhere."""
    return torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))


def completion_hidden(hidden: Tensor, prompt_len: int, completion_len: int) -> Tensor:
    """hidden [N, P + C, D] -> [N, C, D]: the states that predict the completion tokens (positions P-1 ..)."""
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1 (the first completion token is predicted by the last prompt state)")
    return hidden[:, prompt_len - 1 : prompt_len - 1 + completion_len]


#: Attention implementations whose transformers code path separates packed rows found from position_ids
#: (masking_utils' block-diagonal mask for eager / sdpa, varlen kernels for flash_attention_2).
PACKING_ATTENTION = ("eager", "sdpa", "flash_attention_2")


def packing_attention_unsupported(model: nn.Module) -> Optional[str]:
    """None when ``model``'s attention implementation and transformers separate packed rows by their position
    ids, else why not (the checks every adapter's ``packing_unsupported`` starts with)."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        return f"attention implementation {impl!r} is not one of {PACKING_ATTENTION}"
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "this transformers version does not detect packed rows from position_ids (needs >= 4.53)"
    return None


class PackedRows(NamedTuple):
    """m rows in the padding-free layout (module docstring); N = their scored completion tokens."""

    input_ids: Tensor  # [1, T]: each row's attended tokens (prompt without padding + completion through eos)
    position_ids: Tensor  # [1, T]: 0 .. L_i - 1 per row
    hidden_index: Tensor  # [N] position in T of the state that predicts each scored completion token
    row: Tensor  # [N] row (0 .. m-1) of each scored token: its response id for hero_loss's seq_ids
    col: Tensor  # [N] its column in the completion [m, C']

    def unpack(self, values: Tensor, shape: Tuple[int, int]) -> Tensor:
        """values [N, ...] -> [m, C', ...] (shape = (m, C')), zero where no token was scored."""
        out = values.new_zeros(tuple(shape) + tuple(values.shape[1:]))
        return out.index_put((self.row, self.col), values)


def pack_rows(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> PackedRows:
    """Padded rows ``[prompt (P) | completion (C')]``: input_ids / attention_mask [m, P + C'], labels [m, C']
    (``ignore_index`` where not scored) -> ``PackedRows``. Rows keep their order; a scored token must be
    attended and every row needs an attended prompt token (the state that predicts its first token)."""
    keep = attention_mask.bool()
    pos = keep.long().cumsum(1) - 1  # [m, P + C'] the padded layout's positions (CausalLMAdapter.hidden_states)
    lengths = keep.sum(1)
    starts = lengths.cumsum(0) - lengths  # [m] where each row begins in the packed sequence
    row, col = (labels != ignore_index).nonzero(as_tuple=True)
    target = input_ids.shape[1] - labels.shape[1] + col  # padded column of each scored token
    if not bool(keep[row, target].all()):
        raise ValueError("pack_rows: a scored completion token (label != ignore_index) has attention_mask 0")
    if bool((pos[row, target] < 1).any()):
        raise ValueError("pack_rows: a row has no attended prompt token before its completion (nothing predicts "
                         "its first token); give every prompt at least one token (e.g. a BOS)")
    return PackedRows(input_ids[keep][None], pos[keep][None], starts[row] + pos[row, target] - 1, row, col)


def resolve_attn_implementation(name: str, device: torch.device) -> str:
    """"auto" -> "flash_attention_2" when flash_attn is importable and the device is CUDA, else "sdpa"."""
    if name != "auto":
        return name
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _tokenizer_ids(tok) -> Tuple[int, List[int]]:
    pad = getattr(tok, "pad_token_id", None)
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; completions need an end-of-sequence token")
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]
    return (eos_list[0] if pad is None else int(pad)), eos_list


class ModelAdapter:
    """Interface between the trainer and a model family (see module docstring). Subclasses implement all."""

    #: True when rows carry an image that becomes ``pixel_values``.
    uses_images = False

    def prepare_row(self, row: dict, prompt: str, index: int) -> dict:
        """Validate/convert one row before batching (e.g. load its image); raise BadRowError naming it."""
        return row

    def encode(self, rows: Sequence[dict], prompts: Sequence[str]) -> Dict[str, Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask`` [B, P] (+ extra model inputs such as pixel_values)."""
        raise NotImplementedError

    def generate(self, model: nn.Module, inputs: Dict[str, Tensor], *, max_new_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0) -> Tuple[Tensor, Tensor]:
        """Sample with the KV cache -> (completion_ids [N, C], completion_mask [N, C] long: 1 up to and incl. eos)."""
        raise NotImplementedError

    def hidden_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor, **extra) -> Tensor:
        """Last hidden states [N, T, D] (the LM head's input), no logits."""
        raise NotImplementedError

    def packing_unsupported(self, model: nn.Module) -> Optional[str]:
        """None when ``packed_hidden_states`` is exact for ``model``, else why not (one clause, for messages)."""
        return f"{type(self).__name__} has no padding-free forward (packed_hidden_states)"

    def packed_hidden_states(self, model: nn.Module, input_ids: Tensor, position_ids: Tensor,
                             padded_mask: Optional[Tensor] = None, **extra) -> Tensor:
        """Last hidden states [1, T, D] of rows packed into one sequence (``pack_rows``), no logits.

        ``padded_mask`` [m, P + C'] is the rows' attention mask in the padded layout (``input_ids`` holds its
        attended tokens in row order) and ``extra`` the rows' other inputs as ``hidden_states`` takes them (per
        row): adapters whose extra inputs or positions depend on the row layout (images) need them."""
        raise NotImplementedError(self.packing_unsupported(model))

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection (``.weight`` [V, D], ``.bias`` [V] or None)."""
        return model.get_output_embeddings()

    def decode(self, ids: Tensor, mask: Tensor) -> List[str]:
        """Completion texts (tokens where mask == 1, special tokens dropped)."""
        raise NotImplementedError

    def save_pretrained(self, model: nn.Module, path: str) -> None:
        """Export model + tokenizer into directory ``path``."""
        raise NotImplementedError

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Recompute decoder activations in backward (transformers' non-reentrant checkpointing)."""
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def disable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Undo ``enable_gradient_checkpointing``."""
        if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5 name
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()


class CausalLMAdapter(ModelAdapter):
    """Text-only transformers causal LM + a transformers tokenizer."""

    def __init__(self, tokenizer, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.pad_token_id, self.eos_token_ids = _tokenizer_ids(tokenizer)
        self.add_bos = add_bos

    def encode(self, rows, prompts):
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def generate(self, model, inputs, *, max_new_tokens, temperature, top_p=1.0, top_k=0):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=float(temperature), top_p=float(top_p),
            top_k=int(top_k), max_new_tokens=int(max_new_tokens), use_cache=True, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
        )
        seq = out if isinstance(out, Tensor) else out.sequences
        comp = seq[:, ids.shape[1] :]
        if comp.shape[1] == 0:
            raise RuntimeError("generate returned no new tokens")
        return comp, completion_mask_from_eos(comp, self.eos_token_ids)

    @staticmethod
    def _base(model):
        base = model.get_decoder() if hasattr(model, "get_decoder") else None
        if base is None or base is model:
            base = getattr(model, getattr(model, "base_model_prefix", "model"), None) or getattr(model, "model", None)
        if base is None:
            raise TypeError(f"cannot find the base (decoder) model of {type(model).__name__} to get hidden states")
        return base

    def hidden_states(self, model, input_ids, attention_mask, **extra):
        # positions count real tokens only, so left padding never shifts them (as in generate)
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self._base(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos,
                                use_cache=False, **extra)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def packing_unsupported(self, model):
        why = packing_attention_unsupported(model)
        if why:
            return why
        base = self._base(model)
        if not hasattr(sys.modules.get(type(base).__module__), "create_causal_mask"):
            return (f"{type(base).__name__} does not build its attention mask with transformers.masking_utils, "
                    "so packed rows could attend to each other")
        return None

    def packed_hidden_states(self, model, input_ids, position_ids, padded_mask=None, **extra):
        if extra:  # encode() gives none; a subclass that adds some must pack them itself
            raise ValueError(f"CausalLMAdapter.packed_hidden_states cannot pack extra inputs {sorted(extra)}")
        # no attention mask: masking_utils (eager / sdpa) and flash_attention_2 then separate the rows by position_ids
        out = self._base(model)(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def decode(self, ids, mask):
        return self.tokenizer.batch_decode((ids * mask + self.pad_token_id * (1 - mask)).tolist(), skip_special_tokens=True)

    def save_pretrained(self, model, path):
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------
def build_tiny_llama(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                     vocab_size: int = 0, attn_implementation: str = "sdpa", seed: int = 0, tokenizer=None):
    """Random-init LlamaForCausalLM sized for ``tokenizer`` (no downloads) -> (model, tokenizer).

    vocab_size 0 = the tokenizer's size; a larger value pads the LM head. The global torch RNG is restored
    after the init (the init uses ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        raise ValueError("build_tiny_llama needs a tokenizer (model.name 'tiny-llama' brings an offline one)")
    V = max(int(vocab_size), len(tokenizer))
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's CPU RNG stream is untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model, tokenizer


def load_causal_lm(path: str, ctx: BuildContext) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the context's attention implementation and dtype."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=ctx.attn_implementation, dtype=ctx.dtype)


def build_policy(mcfg, *, seed: int, device: torch.device, image_field: str = "image",
                 sample_row: Optional[dict] = None) -> Tuple[nn.Module, ModelAdapter]:
    """Model + adapter from a ``ModelConfig``: a registered name (``hero.registry``), a directory saved in a
    registered format, a transformers image-text-to-text model (``hero.models.hf_vlm``) or any transformers
    causal LM (local path or hub id)."""
    from hero.models.hf_vlm import is_vlm_checkpoint, load_vlm

    dtype = torch.bfloat16 if mcfg.dtype == "bfloat16" else torch.float32
    ctx = BuildContext(seed=seed, device=device, attn_implementation=resolve_attn_implementation(
        mcfg.attn_implementation, device), dtype=dtype, image_field=image_field, sample_row=sample_row)
    builder = model_builder(mcfg.name)
    loader = saved_format_loader(mcfg.name) if builder is None and os.path.isdir(mcfg.name) else None
    if builder is not None:
        model, adapter = builder(mcfg, ctx)
    elif loader is not None:
        model, adapter = loader(mcfg.name, mcfg, ctx)
    elif is_vlm_checkpoint(mcfg.name):
        model, adapter = load_vlm(mcfg.name, attn_implementation=ctx.attn_implementation, dtype=dtype,
                                  freeze_vision=mcfg.freeze_vision, max_pixels=mcfg.max_pixels,
                                  image_field=image_field)
    else:
        model, adapter = _load_transformers_policy(mcfg.name, ctx)
    model = model.to(device=device, dtype=dtype)
    if mcfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(model)
    return model, adapter


def _load_transformers_policy(name: str, ctx: BuildContext) -> Tuple[nn.Module, ModelAdapter]:
    """A transformers causal LM + its tokenizer from a folder or hub id; a name that cannot load fails at once
    with a HeroUserError (``hero.hub.check_model_source``) instead of after the hub's retries."""
    from transformers import AutoTokenizer

    from hero.hub import check_model_source
    from hero.registry import MODELS, PROVIDERS

    check_model_source(name, "model.name", known=sorted(set(MODELS) | set(PROVIDERS["model"])))
    try:
        return load_causal_lm(name, ctx), CausalLMAdapter(AutoTokenizer.from_pretrained(name), add_bos=False)
    except OSError as e:  # transformers: not a model folder / no such repo / no config.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeroUserError(f"model.name {name!r} does not load as a transformers causal LM: {first}") from e


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with requires_grad off, in eval mode (the reference policy)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
