"""A tiny random-init vision-language model, an offline tokenizer and a processor (no downloads).

Pieces
------
* ``TinyTokenizer``: lossless greedy longest-match tokenizer over special tokens, a few task word pieces
  ("Is there a ", " in the image?", "I see ", "yes", "no", ", ") and every printable ASCII character, so any
  ASCII text round-trips and the digits-POPE texts are short (a CoT target is ~13 tokens). Special tokens
  ``<pad> <bos> <eos> <unk> <image>`` and the tags ``<think> </think> <answer> </answer>`` are single tokens;
  "yes" and "no" are single tokens, so the answer decision is exactly one next-token distribution.
* ``TinyVLMConfig`` / ``TinyVLM``: a patch encoder (Conv2d patchify + learned positions + a small
  ``nn.TransformerEncoder``) whose patch embeddings go through a 2-layer MLP projector into the text
  embedding space, and a transformers causal LM (``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` built from its
  config, random init). LLaVA-style: the prompt holds one ``<image>`` placeholder token per patch and the
  projected patch embeddings replace those placeholders' embeddings (``inputs_embeds``).
* ``TinyVLMProcessor``: images + questions -> ``input_ids`` / ``attention_mask`` / ``pixel_values`` (left
  padding), and supervised batches with ``labels`` (prompt and padding are -100).

Conventions the trainer relies on
---------------------------------
* Sequences: ``<bos> <image>*P question_tokens | completion_tokens <eos>``. Padding may sit on the left
  (prompts) and on the right (completions); positions are ``cumsum(attention_mask) - 1`` so padding never
  shifts them and a left-padded row gives the same hidden states as the unpadded row.
* ``labels`` follow Hugging Face: same shape as ``input_ids``; position t's logits predict token t+1, so the
  loss uses ``logits[:, :-1]`` against ``labels[:, 1:]`` (and the fused LM-head loss uses
  ``model.hidden_states(...)[:, :-1]`` with ``model.get_output_embeddings().weight``).
* ``generate`` returns only the new tokens, padded with ``pad_token_id`` after the first eos, and a
  ``completion_mask``; ``completion_hidden_states(prompt_ids, prompt_mask, pixel_values, completion_ids,
  completion_mask)`` gives the [B, Tc, D] states that score those tokens (for the RL loss).

Size: the default (hidden 64, 2 decoder layers, 1 vision layer, vocab 112) has 0.13M parameters; a
forward+backward on 8 x 37 tokens takes 26-41 ms on one core of a busy shared CPU (less when idle), and 20
greedy tokens for 8 prompts ~100 ms. For such tiny matmuls use ``torch.set_num_threads(1)`` on a shared
machine: OpenMP threads contending for cores made generate ~30x slower in our runs.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hero.io import atomic_write_bytes

__all__ = [
    "SPECIAL_TOKENS",
    "TASK_PIECES",
    "TinyTokenizer",
    "TinyVLMConfig",
    "TinyVLM",
    "TinyVLMOutput",
    "TinyGenerateOutput",
    "TinyVLMProcessor",
    "build_tiny_vlm",
    "load_tiny_vlm",
]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "<think>", "</think>", "<answer>", "</answer>")
#: Control tokens dropped by ``decode(..., skip_special_tokens=True)`` (the tags are kept: they carry meaning).
_CONTROL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")
TASK_PIECES = ("Is there a ", " in the image?", "I see ", "yes", "no", ", ")
_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n\t"


# ----------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------
class TinyTokenizer:
    """Lossless greedy longest-match tokenizer (specials > pieces > single characters).

    Vocabulary = SPECIAL_TOKENS (ids 0..8: pad=0, bos=1, eos=2, unk=3, image=4, then the tags) + ``pieces``
    + printable ASCII + newline/tab. Characters outside that set become ``<unk>``.
    ``encode`` never adds bos/eos; the processor does.
    """

    def __init__(self, pieces: Sequence[str] = TASK_PIECES, chars: str = _CHARS):
        tokens: List[str] = list(SPECIAL_TOKENS)
        for p in list(pieces) + list(chars):
            if p and p not in tokens:
                tokens.append(p)
        self.pieces = tuple(pieces)
        self.chars = chars
        self._id_to_token = tokens
        self._token_to_id = {t: i for i, t in enumerate(tokens)}
        multi = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)
        # Longest alternatives first: regex alternation is ordered, so this is greedy longest-match.
        self._re = re.compile("|".join(re.escape(t) for t in multi) + r"|.", re.DOTALL)

    # ids of the special tokens ------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        return self._token_to_id["<pad>"]

    @property
    def bos_token_id(self) -> int:
        return self._token_to_id["<bos>"]

    @property
    def eos_token_id(self) -> int:
        return self._token_to_id["<eos>"]

    @property
    def unk_token_id(self) -> int:
        return self._token_to_id["<unk>"]

    @property
    def image_token_id(self) -> int:
        return self._token_to_id["<image>"]

    @property
    def vocab_size(self) -> int:
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]):
        if isinstance(tokens, str):
            return self._token_to_id.get(tokens, self.unk_token_id)
        return [self._token_to_id.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]):
        if isinstance(ids, (int, np.integer)):
            return self._id_to_token[int(ids)]
        return [self._id_to_token[int(i)] for i in ids]

    # text <-> ids ----------------------------------------------------------------------------------
    def tokenize(self, text: str) -> List[str]:
        return self._re.findall(text)

    def encode(self, text: str) -> List[int]:
        """Text -> ids (no bos/eos added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        unk = self.unk_token_id
        return [self._token_to_id.get(t, unk) for t in self._re.findall(text)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text. skip_special_tokens drops <pad> <bos> <eos> <image> (the think/answer tags stay)."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        skip = {self._token_to_id[t] for t in _CONTROL_TOKENS} if skip_special_tokens else set()
        return "".join(self._id_to_token[int(i)] for i in ids if int(i) not in skip)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> List[str]:
        if isinstance(batch, Tensor):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def pad(self, sequences: Sequence[Sequence[int]], padding_side: str = "left", pad_value: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Pad id lists into (ids [B, T] long, attention_mask [B, T] long). padding_side: "left" | "right"."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_value = self.pad_token_id if pad_value is None else pad_value
        T = max((len(s) for s in sequences), default=0)
        ids = torch.full((len(sequences), T), pad_value, dtype=torch.long)
        mask = torch.zeros((len(sequences), T), dtype=torch.long)
        for i, s in enumerate(sequences):
            if not len(s):
                continue
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    def __call__(self, texts: Union[str, Sequence[str]], padding_side: str = "left", add_bos: bool = False) -> Dict[str, Tensor]:
        """Batch-encode texts -> {"input_ids", "attention_mask"} (padded, long tensors)."""
        if isinstance(texts, str):
            texts = [texts]
        seqs = [([self.bos_token_id] if add_bos else []) + self.encode(t) for t in texts]
        ids, mask = self.pad(seqs, padding_side)
        return {"input_ids": ids, "attention_mask": mask}

    # persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        data = {"type": "hero-tiny-tokenizer", "version": 1, "pieces": list(self.pieces), "chars": self.chars,
                "vocab": self._id_to_token}
        atomic_write_bytes(os.path.join(path, "tokenizer.json"), json.dumps(data, indent=1).encode("utf-8"))

    @classmethod
    def from_pretrained(cls, path: str) -> "TinyTokenizer":
        with open(os.path.join(path, "tokenizer.json"), "r", encoding="utf-8") as f:
            data = json.load(f)
        if data.get("type") != "hero-tiny-tokenizer":
            raise ValueError(f"{path}/tokenizer.json is not a hero tiny tokenizer")
        tok = cls(pieces=data["pieces"], chars=data["chars"])
        if tok._id_to_token != data["vocab"]:
            raise ValueError(f"{path}/tokenizer.json: vocabulary does not match its pieces/chars")
        return tok


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
@dataclass
class TinyVLMConfig:
    """Sizes of the tiny VLM. ``image_size`` = (H, W) of the (grayscale) input; both divisible by patch_size."""

    vocab_size: int = 110
    image_size: Tuple[int, int] = (8, 24)
    patch_size: int = 4
    num_channels: int = 1
    vision_hidden_size: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    decoder_type: str = "llama"  # "llama" | "qwen2"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    image_token_id: int = 4

    def __post_init__(self):
        self.image_size = tuple(int(x) for x in self.image_size)
        if len(self.image_size) != 2:
            raise ValueError(f"image_size must be (H, W), got {self.image_size}")
        H, W = self.image_size
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.decoder_type not in ("llama", "qwen2"):
            raise ValueError(f"decoder_type must be 'llama' or 'qwen2', got {self.decoder_type!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError("vision_hidden_size must divide by vision_heads")

    @property
    def num_patches(self) -> int:
        H, W = self.image_size
        return (H // self.patch_size) * (W // self.patch_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyVLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"model_type"}
        if unknown:
            raise ValueError(f"unknown TinyVLMConfig fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})


class _VisionTower(nn.Module):
    """[B, C, H, W] -> [B, P, hidden_size]: patchify conv, learned positions, transformer, MLP projector."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.patch = nn.Conv2d(cfg.num_channels, cfg.vision_hidden_size, cfg.patch_size, cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(1, cfg.num_patches, cfg.vision_hidden_size) * cfg.initializer_range)
        layer = nn.TransformerEncoderLayer(
            cfg.vision_hidden_size, cfg.vision_heads, 2 * cfg.vision_hidden_size, dropout=0.0,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.vision_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.vision_hidden_size)
        self.proj = nn.Sequential(
            nn.Linear(cfg.vision_hidden_size, cfg.hidden_size), nn.GELU(), nn.Linear(cfg.hidden_size, cfg.hidden_size)
        )
        self.image_size = cfg.image_size

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.shape[-2:] != self.image_size:
            raise ValueError(f"pixel_values must be [B, C, {self.image_size[0]}, {self.image_size[1]}], got {tuple(pixel_values.shape)}")
        x = self.patch(pixel_values).flatten(2).transpose(1, 2) + self.pos
        return self.proj(self.norm(self.encoder(x)))


@dataclass
class TinyVLMOutput:
    """Like a HF CausalLMOutput: loss (mean next-token CE over labels != -100, or None), logits [B, T, V]
    (None with return_logits=False), last_hidden_state [B, T, D] (final-norm output = LM-head input),
    hidden_states (tuple per layer, when requested)."""

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    last_hidden_state: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None

    def __getitem__(self, key):
        return getattr(self, key)


@dataclass
class TinyGenerateOutput:
    """sequences: [B, T_new] new tokens (pad after the first eos); completion_mask: [B, T_new] 1 up to and
    including eos; logits: [B, T_new, V] float32 raw logits of each step (before temperature) when
    output_logits=True."""

    sequences: Tensor
    completion_mask: Tensor
    logits: Optional[Tensor] = None


def _build_decoder(cfg: TinyVLMConfig) -> nn.Module:
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range, tie_word_embeddings=False, pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, use_cache=True,
    )
    if cfg.decoder_type == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf_cfg = LlamaConfig(rope_theta=cfg.rope_theta, **common)
        cls = LlamaForCausalLM
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        hf_cfg = Qwen2Config(rope_theta=cfg.rope_theta, use_sliding_window=False, **common)
        cls = Qwen2ForCausalLM
    # sdpa on CPU and GPU alike; the choice is explicit so no backend probing happens at build time.
    hf_cfg._attn_implementation = "sdpa"
    return cls(hf_cfg)


class TinyVLM(nn.Module):
    """Tiny VLM: vision tower + projector + transformers causal LM (see module docstring).

    forward(input_ids [B, T], attention_mask [B, T], pixel_values [B, C, H, W], labels [B, T] | None)
    -> TinyVLMOutput. ``input_ids`` must hold exactly ``config.num_patches`` image tokens per row that has an
    image (the processor builds them); rows of a batch either all have images or none do.
    """

    def __init__(self, config: TinyVLMConfig):
        super().__init__()
        self.config = config
        self.vision = _VisionTower(config)
        self.lm = _build_decoder(config)
        params = inspect.signature(self.lm.model.forward).parameters
        # transformers renamed past_key_values -> cache (5.x); accept both so >=4.45 keeps working.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # HF-like accessors -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (weight [V, D], no bias): logits = last_hidden_state @ weight.T."""
        return self.lm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def gradient_checkpointing_enable(self) -> None:
        """Recompute decoder layers in backward (non-reentrant checkpointing)."""
        kw = {"use_reentrant": False}
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.lm, "activation_checkpointing_disable"):
            self.lm.activation_checkpointing_disable()
        else:
            self.lm.gradient_checkpointing_disable()

    # embedding -------------------------------------------------------------------------------------
    def embed(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None) -> Tensor:
        """Token embeddings with the projected patch embeddings written over the <image> placeholders."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        emb = self.get_input_embeddings()(input_ids)
        is_img = input_ids == self.config.image_token_id
        n_img = int(is_img.sum())
        if pixel_values is None:
            if n_img:
                raise ValueError("input_ids contain <image> tokens but pixel_values is None")
            return emb
        if pixel_values.dim() != 4 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values must be [B={input_ids.shape[0]}, C, H, W], got {tuple(pixel_values.shape)}")
        P = self.config.num_patches
        per_row = is_img.sum(1)
        if not bool((per_row == P).all()):
            raise ValueError(f"each row of input_ids needs exactly {P} <image> tokens, got {per_row.tolist()}")
        feats = self.vision(pixel_values.to(emb.dtype)).to(emb.dtype)  # [B, P, D]
        # masked_scatter fills True positions in row-major order: row b's P slots get row b's P patches.
        return emb.masked_scatter(is_img.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))

    @staticmethod
    def position_ids(attention_mask: Tensor) -> Tensor:
        """cumsum(mask) - 1, clamped at 0: padding (left or right) never shifts real positions."""
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    def _run(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None,
             output_hidden_states: bool = False):
        kw = {self._cache_kw: cache} if cache is not None else {}
        return self.lm.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=cache is not None, output_hidden_states=output_hidden_states, **kw,
        )

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      pixel_values: Optional[Tensor] = None) -> Tensor:
        """Final-norm hidden states [B, T, D] without computing logits (input of the fused LM-head loss)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        emb = self.embed(input_ids, pixel_values)
        return self._run(emb, attention_mask, self.position_ids(attention_mask)).last_hidden_state

    def completion_hidden_states(self, prompt_ids: Tensor, prompt_mask: Tensor, pixel_values: Optional[Tensor],
                                 completion_ids: Tensor, completion_mask: Tensor) -> Tensor:
        """Hidden states that predict each completion token, for RL losses on sampled completions.

        prompt_ids/prompt_mask: [B, Tp] left-padded (the processor's output); completion_ids/completion_mask:
        [B, Tc] right-padded (``generate``'s sequences/completion_mask). Returns [B, Tc, D]: row t is the
        final-norm state at the position *before* completion token t, so
        ``logits = out @ get_output_embeddings().weight.T`` scores ``completion_ids`` directly (labels =
        completion_ids with -100 where completion_mask == 0). Equals the logits ``generate`` saw.
        """
        if prompt_ids.shape != prompt_mask.shape or completion_ids.shape != completion_mask.shape:
            raise ValueError("prompt_ids/prompt_mask and completion_ids/completion_mask must have matching shapes")
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        h = self.hidden_states(ids, mask, pixel_values)
        Tp = prompt_ids.shape[1]
        return h[:, Tp - 1 : -1]

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, output_hidden_states: bool = False,
                return_logits: bool = True) -> TinyVLMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        emb = self.embed(input_ids, pixel_values)
        out = self._run(emb, attention_mask, self.position_ids(attention_mask), output_hidden_states=output_hidden_states)
        h = out.last_hidden_state
        logits = self.get_output_embeddings()(h) if (return_logits or labels is not None) else None
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return TinyVLMOutput(
            loss=loss, logits=logits if return_logits else None, last_hidden_state=h,
            hidden_states=getattr(out, "hidden_states", None) if output_hidden_states else None,
        )

    # generation ------------------------------------------------------------------------------------
    def _new_cache(self):
        from transformers.cache_utils import DynamicCache

        try:
            return DynamicCache(config=self.lm.config)
        except TypeError:  # transformers < 4.56 has no config argument
            return DynamicCache()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, pixel_values: Optional[Tensor] = None,
                 *, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: Union[int, Sequence[int], None] = None,
                 pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 output_logits: bool = False, use_cache: bool = True) -> TinyGenerateOutput:
        """Sample or greedy-decode up to max_new_tokens new tokens with a KV cache.

        Prompts must be left-padded (the processor does that). do_sample=False or temperature == 0 ->
        greedy; else sample from softmax(logits / temperature), optionally restricted by top_k / top_p.
        generator: a torch.Generator for reproducible sampling. eos_token_id: int or list (default
        config.eos_token_id); a row stops at its first eos. use_cache=False recomputes the full sequence each
        step (slow; for testing the cache).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if do_sample and not (temperature >= 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        greedy = (not do_sample) or temperature == 0
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        B = input_ids.shape[0]
        mask = attention_mask.long()
        pos = self.position_ids(mask)
        emb = self.embed(input_ids, pixel_values)
        cache = self._new_cache() if use_cache else None
        h = self._run(emb, mask, pos, cache=cache).last_hidden_state[:, -1]
        next_pos = pos[:, -1] + 1
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        tokens, step_logits = [], []
        lm_head = self.get_output_embeddings()
        for step in range(max_new_tokens):
            logits = lm_head(h).float()  # [B, V]
            if output_logits:
                step_logits.append(logits)
            if greedy:
                nxt = logits.argmax(-1)
            else:
                nxt = self._sample(logits / temperature, top_k, top_p, generator)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            tokens.append(nxt)
            finished = finished | torch.isin(nxt, eos_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if use_cache:
                e = self.get_input_embeddings()(nxt[:, None])
                h = self._run(e, mask, next_pos[:, None], cache=cache).last_hidden_state[:, -1]
            else:
                # prompt embeddings (with the image) + plain token embeddings of what was generated, exactly
                # what the cached path feeds (a sampled <image> token is never taken for a placeholder)
                e = torch.cat([emb, self.get_input_embeddings()(torch.stack(tokens, 1))], dim=1)
                h = self._run(e, mask, self.position_ids(mask)).last_hidden_state[:, -1]
            next_pos = next_pos + 1
        seq = torch.stack(tokens, 1)
        is_eos = torch.isin(seq, eos_ids)
        # 1 up to and including the first eos of each row.
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        completion_mask = (~after_eos).long()
        return TinyGenerateOutput(sequences=seq, completion_mask=completion_mask,
                                  logits=torch.stack(step_logits, 1) if output_logits else None)

    @staticmethod
    def _sample(logits: Tensor, top_k: int, top_p: float, generator: Optional[torch.Generator]) -> Tensor:
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
            probs = sorted_logits.softmax(-1)
            # drop a token when the mass before it already reaches top_p (always keeps the top token)
            drop = (probs.cumsum(-1) - probs) >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    # persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, path: str, tokenizer: Optional[TinyTokenizer] = None) -> None:
        """Write config.json + model.safetensors (+ tokenizer.json), each atomically (temp + os.replace)."""
        from safetensors.torch import save

        os.makedirs(path, exist_ok=True)
        cfg = dict(self.config.to_dict(), model_type="hero-tiny-vlm")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(os.path.join(path, "model.safetensors"), save(state, metadata={"format": "pt"}))
        atomic_write_bytes(os.path.join(path, "config.json"), json.dumps(cfg, indent=1).encode("utf-8"))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str, map_location: Union[str, torch.device] = "cpu") -> "TinyVLM":
        from safetensors.torch import load_file

        with open(os.path.join(path, "config.json"), "r", encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("model_type") != "hero-tiny-vlm":
            raise ValueError(f"{path}/config.json is not a hero tiny VLM config")
        model = cls(TinyVLMConfig.from_dict(cfg))
        state = load_file(os.path.join(path, "model.safetensors"), device="cpu")
        model.load_state_dict(state, strict=True)
        return model.to(map_location)


# ----------------------------------------------------------------------------------------------
# processor
# ----------------------------------------------------------------------------------------------
class TinyVLMProcessor:
    """Turns (images, questions[, targets]) into model inputs.

    Images: uint8 arrays [H, W] or [H, W, 3] (RGB is averaged to gray when the model has 1 channel;
    other sizes are resized bilinearly with PIL). pixel_values = (x / 255 - 0.5) / 0.5, float32
    [B, C, H, W]. Prompt = ``<bos> <image>*P question``.
    """

    def __init__(self, tokenizer: TinyTokenizer, config: TinyVLMConfig):
        if tokenizer.image_token_id != config.image_token_id or tokenizer.vocab_size != config.vocab_size:
            raise ValueError("tokenizer and config disagree on the vocabulary (build both with build_tiny_vlm)")
        self.tokenizer = tokenizer
        self.config = config

    def pixel_values(self, images: Sequence[np.ndarray]) -> Tensor:
        H, W = self.config.image_size
        C = self.config.num_channels
        out = np.empty((len(images), C, H, W), dtype=np.float32)
        for i, img in enumerate(images):
            a = np.asarray(img)
            if a.dtype != np.uint8:
                raise ValueError(f"images[{i}] must be uint8, got {a.dtype}")
            if a.ndim == 3 and C == 1:
                a = np.rint(a[..., :3].astype(np.float32).mean(-1)).astype(np.uint8)
            elif a.ndim == 2 and C == 3:
                a = np.repeat(a[..., None], 3, axis=-1)
            if a.shape[:2] != (H, W):
                from PIL import Image

                a = np.asarray(Image.fromarray(a).resize((W, H), Image.BILINEAR), dtype=np.uint8)
            a = a.astype(np.float32) / 255.0
            out[i] = (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)) * 2.0 - 1.0
        return torch.from_numpy(out)

    def prompt_ids(self, question: str) -> List[int]:
        t = self.tokenizer
        return [t.bos_token_id] + [t.image_token_id] * self.config.num_patches + t.encode(question)

    def __call__(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> Dict[str, Tensor]:
        """Generation inputs: input_ids / attention_mask [B, T] (left-padded), pixel_values [B, C, H, W]."""
        if len(images) != len(questions):
            raise ValueError(f"images ({len(images)}) and questions ({len(questions)}) differ in length")
        ids, mask = self.tokenizer.pad([self.prompt_ids(q) for q in questions], "left")
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": self.pixel_values(images)}

    def sft_batch(self, images: Sequence[np.ndarray], questions: Sequence[str], targets: Sequence[str]) -> Dict[str, Tensor]:
        """Supervised batch: prompt + target + <eos>, left-padded; labels = ids on target and eos, else -100."""
        if not (len(images) == len(questions) == len(targets)):
            raise ValueError("images, questions and targets must have the same length")
        seqs, labs = [], []
        for q, tgt in zip(questions, targets):
            p = self.prompt_ids(q)
            c = self.tokenizer.encode(tgt) + [self.tokenizer.eos_token_id]
            seqs.append(p + c)
            labs.append([-100] * len(p) + c)
        ids, mask = self.tokenizer.pad(seqs, "left")
        labels, _ = self.tokenizer.pad(labs, "left", pad_value=-100)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": self.pixel_values(images), "labels": labels}

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> List[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


def build_tiny_vlm(image_size: Tuple[int, int] = (8, 24), seed: int = 0, **config_overrides) -> Tuple[TinyVLM, TinyVLMProcessor]:
    """Random-init tiny VLM + processor (tokenizer inside) for images of ``image_size`` (H, W).

    config_overrides: any TinyVLMConfig field (hidden_size, num_layers, patch_size, decoder_type, ...).
    ``torch.manual_seed(seed)`` is used for the init, then the global RNG state is restored.
    """
    tok = TinyTokenizer()
    cfg = TinyVLMConfig(
        vocab_size=tok.vocab_size, image_size=tuple(image_size), pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, image_token_id=tok.image_token_id,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's CPU RNG stream is untouched
        torch.manual_seed(seed)
        model = TinyVLM(cfg)
    return model, TinyVLMProcessor(tok, cfg)


def load_tiny_vlm(path: str, map_location: Union[str, torch.device] = "cpu") -> Tuple[TinyVLM, TinyVLMProcessor]:
    """Load a model saved with ``model.save_pretrained(path, tokenizer=processor.tokenizer)``."""
    model = TinyVLM.from_pretrained(path, map_location)
    return model, TinyVLMProcessor(TinyTokenizer.from_pretrained(path), model.config)
