"""The confidence-trap models in the trainer: ``model.name: tiny-vlm`` (TinyVLM, rows carry an image) and
``model.name: tiny-llama`` (a random-init Llama with the offline TinyTokenizer), and the folders they save.

Registered in ``hero.registry`` by this package's ``__init__``; built by ``hero.rollout.build_policy``.
"""
from __future__ import annotations

import numpy as np

from hero.data.jsonl import load_image
from hero.rollout import (BadRowError, CausalLMAdapter, ModelAdapter, build_tiny_llama, completion_mask_from_eos,
                          load_causal_lm, row_name)

from .tiny_vlm import TinyTokenizer, build_tiny_vlm, load_tiny_vlm

__all__ = ["TinyVLMModelAdapter", "TinyTokenizerAdapter", "build_tiny_vlm_policy", "build_tiny_llama_policy",
           "load_tiny_vlm_policy", "load_tiny_llama_policy"]


class TinyTokenizerAdapter(CausalLMAdapter):
    """A transformers causal LM with the experiment's offline ``TinyTokenizer`` (its own padding call)."""

    def encode(self, rows, prompts):
        return self.tokenizer(list(prompts), padding_side="left", add_bos=self.add_bos)


class TinyVLMModelAdapter(ModelAdapter):
    """The trainer's adapter for TinyVLM + TinyVLMProcessor; rows need an image (uint8 array or a path PIL
    can open). (``diagnostics.TinyVLMAdapter`` is the diagnosis side: it holds the model and scores answers.)"""

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
        if isinstance(img, (list, tuple)):  # a JSONL row may list several images; TinyVLM has one image slot
            if len(img) != 1:
                raise BadRowError(f"row {row_name(row, index)} has {len(img)} images but the tiny VLM takes one "
                                  "image per row: keep one image per row (or use a transformers VLM)",
                                  row_name(row, index))
            img = img[0]
        try:
            if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__"):
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

    def enable_gradient_checkpointing(self, model):
        model.gradient_checkpointing_enable()


def _image_size(ctx):
    """(H, W) of the first row's image when it is an array (a path is sized by the default)."""
    img = (ctx.sample_row or {}).get(ctx.image_field)
    if isinstance(img, (list, tuple)):  # several images (prepare_row refuses the row): size by the first
        img = img[0] if img else None
    return tuple(np.asarray(img).shape[:2]) if img is not None and not isinstance(img, str) else (8, 24)


def build_tiny_vlm_policy(mcfg, ctx):
    """Random-init TinyVLM sized by ``mcfg`` for the dataset's image size -> (model, adapter)."""
    model, proc = build_tiny_vlm(image_size=_image_size(ctx), seed=ctx.seed, hidden_size=mcfg.hidden_size,
                                 num_layers=mcfg.num_layers, num_heads=mcfg.num_heads,
                                 num_kv_heads=min(2, mcfg.num_heads), intermediate_size=mcfg.intermediate_size)
    if ctx.attn_implementation != "sdpa" and hasattr(model.lm, "set_attn_implementation"):
        model.lm.set_attn_implementation(ctx.attn_implementation)
    return model, TinyVLMModelAdapter(proc, ctx.image_field)


def build_tiny_llama_policy(mcfg, ctx):
    """Random-init LlamaForCausalLM + TinyTokenizer -> (model, adapter)."""
    model, tok = build_tiny_llama(mcfg.hidden_size, mcfg.num_layers, mcfg.num_heads, mcfg.intermediate_size,
                                  mcfg.vocab_size, ctx.attn_implementation, ctx.seed, tokenizer=TinyTokenizer())
    return model, TinyTokenizerAdapter(tok)


def load_tiny_vlm_policy(path, ctx):
    """A TinyVLM folder (``config.json`` model_type ``hero-tiny-vlm``) -> (model, adapter)."""
    model, proc = load_tiny_vlm(path)
    return model, TinyVLMModelAdapter(proc, ctx.image_field)


def load_tiny_llama_policy(path, ctx):
    """A tiny-llama exported by the trainer (``tokenizer.json`` type ``hero-tiny-tokenizer``) -> (model, adapter)."""
    return load_causal_lm(path, ctx), TinyTokenizerAdapter(TinyTokenizer.from_pretrained(path))
