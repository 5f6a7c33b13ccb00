"""Model adapters and the rollout helpers of the trainer.

A model family plugs into the trainer through an adapter (``ModelAdapter``): how to turn dataset rows into
left-padded prompt tensors, how to sample completions (with a KV cache), how to get the LAST HIDDEN STATES
of a sequence without computing logits, where the LM head is, and how to decode. Two adapters ship:

* ``CausalLMAdapter``: any transformers causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) with a
  transformers tokenizer or ``hero.tiny_vlm.TinyTokenizer``; hidden states come from the base model
  (``model.get_decoder()`` / ``model.model``), never from ``model(...).logits``.
* ``TinyVLMAdapter``: ``hero.tiny_vlm.TinyVLM`` + its processor; rows carry an image, ``pixel_values`` are
  passed through to ``generate`` and ``hidden_states``.

Sequence layout shared with the trainer: ``[left-padded prompt (P) | completion (C, right-padded)]``. Hidden
state ``t`` predicts token ``t + 1``, so the completion tokens ``P .. P+C-1`` are scored from the hidden
states ``P-1 .. P+C-2`` (``completion_hidden``); the prompt positions never reach the LM head.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BadRowError",
    "ModelAdapter",
    "CausalLMAdapter",
    "TinyVLMAdapter",
    "completion_mask_from_eos",
    "completion_hidden",
    "resolve_attn_implementation",
    "build_policy",
    "build_tiny_llama",
]


class BadRowError(ValueError):
    """A dataset row that cannot be used (missing field, image that does not load, NaN reward).

    ``row_id`` is the row's ``id`` field when it has one, else ``index=<position in the dataset>``."""

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


def completion_hidden(hidden: Tensor, prompt_len: int, completion_len: int) -> Tensor:
    """hidden [N, P + C, D] -> [N, C, D]: the states that predict the completion tokens (positions P-1 ..)."""
    if prompt_len < 1:
        raise ValueError("prompt_len must be >= 1 (the first completion token is predicted by the last prompt state)")
    return hidden[:, prompt_len - 1 : prompt_len - 1 + completion_len]


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

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection (``.weight`` [V, D], ``.bias`` [V] or None)."""
        return model.get_output_embeddings()

    def decode(self, ids: Tensor, mask: Tensor) -> List[str]:
        """Completion texts (tokens where mask == 1, special tokens dropped)."""
        raise NotImplementedError

    def save_pretrained(self, model: nn.Module, path: str) -> None:
        """Export model + tokenizer into directory ``path``."""
        raise NotImplementedError


class CausalLMAdapter(ModelAdapter):
    """Text-only transformers causal LM + tokenizer (a transformers tokenizer or hero's TinyTokenizer)."""

    def __init__(self, tokenizer, add_bos: bool = True):
        self.tokenizer = tokenizer
        self.pad_token_id, self.eos_token_ids = _tokenizer_ids(tokenizer)
        self.add_bos = add_bos

    def _is_tiny(self) -> bool:
        from hero.tiny_vlm import TinyTokenizer

        return isinstance(self.tokenizer, TinyTokenizer)

    def encode(self, rows, prompts):
        if self._is_tiny():
            return self.tokenizer(list(prompts), padding_side="left", add_bos=self.add_bos)
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

    def decode(self, ids, mask):
        return self.tokenizer.batch_decode((ids * mask + self.pad_token_id * (1 - mask)).tolist(), skip_special_tokens=True)

    def save_pretrained(self, model, path):
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class TinyVLMAdapter(ModelAdapter):
    """hero.tiny_vlm.TinyVLM + TinyVLMProcessor; rows need an image (uint8 array or a path PIL can open)."""

    uses_images = True

    def __init__(self, processor, image_field: str = "image"):
        self.processor = processor
        self.image_field = image_field
        tok = processor.tokenizer
        self.image_token_id = tok.image_token_id
        self.num_patches = processor.config.num_patches
        # A sampled <image> token ends the completion like eos: as an input it would be taken for an image
        # placeholder (see hidden_states).
        self.pad_token_id, self.eos_token_ids = tok.pad_token_id, [tok.eos_token_id, tok.image_token_id]

    def prepare_row(self, row, prompt, index):
        if self.image_field not in row:
            raise BadRowError(f"row {row_name(row, index)} has no image field {self.image_field!r}", row_name(row, index))
        img = row[self.image_field]
        try:
            if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__"):
                from hero.data.jsonl import load_image

                img = load_image(img)
            arr = np.asarray(img)
            self.processor.pixel_values([arr])  # validates dtype / shape / resizability
        except Exception as e:  # noqa: BLE001 - PIL and numpy raise many types for a broken image
            raise BadRowError(f"row {row_name(row, index)}: image does not load ({type(e).__name__}: {e})",
                              row_name(row, index)) from None
        new = dict(row)
        new[self.image_field] = arr
        return new

    def encode(self, rows, prompts):
        return self.processor([r[self.image_field] for r in rows], list(prompts))

    def generate(self, model, inputs, *, max_new_tokens, temperature, top_p=1.0, top_k=0):
        out = model.generate(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                             max_new_tokens=int(max_new_tokens), do_sample=True, temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p), use_cache=True, eos_token_id=self.eos_token_ids)
        return out.sequences, completion_mask_from_eos(out.sequences, self.eos_token_ids)

    def hidden_states(self, model, input_ids, attention_mask, **extra):
        # <image> tokens beyond a row's first num_patches were sampled in the completion, where they are the
        # row's last scored token (they end it); as inputs they only feed masked positions, so replace them
        # with pad instead of letting the model take them for image placeholders.
        is_img = input_ids == self.image_token_id
        extra_img = is_img & (is_img.long().cumsum(1) > self.num_patches)
        ids = input_ids.masked_fill(extra_img, self.pad_token_id)
        return model.hidden_states(ids, attention_mask, extra.get("pixel_values"))

    def decode(self, ids, mask):
        return self.processor.batch_decode((ids * mask + self.pad_token_id * (1 - mask)).tolist(), skip_special_tokens=True)

    def save_pretrained(self, model, path):
        model.save_pretrained(path, tokenizer=self.processor.tokenizer)


# ----------------------------------------------------------------------------------------------
# model construction
# ----------------------------------------------------------------------------------------------
def build_tiny_llama(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                     vocab_size: int = 0, attn_implementation: str = "sdpa", seed: int = 0, tokenizer=None):
    """Random-init LlamaForCausalLM from a config + hero's offline TinyTokenizer (no downloads).

    vocab_size 0 = the tokenizer's size; a larger value pads the LM head. The global torch RNG is restored
    after the init (the init uses ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hero.tiny_vlm import TinyTokenizer

    tok = tokenizer if tokenizer is not None else TinyTokenizer()
    V = max(int(vocab_size), len(tok))
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads, max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id, bos_token_id=getattr(tok, "bos_token_id", None), eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model, tok


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return d if isinstance(d, dict) else {}


def build_policy(mcfg, *, seed: int, device: torch.device, image_size: Optional[Tuple[int, int]] = None,
                 image_field: str = "image") -> Tuple[nn.Module, ModelAdapter]:
    """Model + adapter from a ``ModelConfig`` (see hero.config for the meaning of ``name``)."""
    attn = resolve_attn_implementation(mcfg.attn_implementation, device)
    dtype = torch.bfloat16 if mcfg.dtype == "bfloat16" else torch.float32
    name = mcfg.name
    if name == "tiny-llama":
        model, tok = build_tiny_llama(mcfg.hidden_size, mcfg.num_layers, mcfg.num_heads, mcfg.intermediate_size,
                                      mcfg.vocab_size, attn, seed)
        adapter: ModelAdapter = CausalLMAdapter(tok)
    elif name == "tiny-vlm":
        from hero.tiny_vlm import build_tiny_vlm

        model, proc = build_tiny_vlm(image_size=tuple(image_size or (8, 24)), seed=seed, hidden_size=mcfg.hidden_size,
                                     num_layers=mcfg.num_layers, num_heads=mcfg.num_heads,
                                     num_kv_heads=min(2, mcfg.num_heads), intermediate_size=mcfg.intermediate_size)
        if attn != "sdpa" and hasattr(model.lm, "set_attn_implementation"):
            model.lm.set_attn_implementation(attn)
        adapter = TinyVLMAdapter(proc, image_field)
    else:
        cfg_path = os.path.join(name, "config.json")
        if os.path.isfile(cfg_path) and _read_json(cfg_path).get("model_type") == "hero-tiny-vlm":
            from hero.tiny_vlm import load_tiny_vlm

            model, proc = load_tiny_vlm(name)
            adapter = TinyVLMAdapter(proc, image_field)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn, dtype=dtype)
            tok_path = os.path.join(name, "tokenizer.json")
            if os.path.isfile(tok_path) and _read_json(tok_path).get("type") == "hero-tiny-tokenizer":
                from hero.tiny_vlm import TinyTokenizer  # a tiny-llama exported by the trainer

                adapter = CausalLMAdapter(TinyTokenizer.from_pretrained(name))
            else:
                adapter = CausalLMAdapter(AutoTokenizer.from_pretrained(name), add_bos=False)
    model = model.to(device=device, dtype=dtype)
    if mcfg.gradient_checkpointing:
        if isinstance(adapter, TinyVLMAdapter):
            model.gradient_checkpointing_enable()
        elif hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, adapter


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with requires_grad off, in eval mode (the reference policy)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()
