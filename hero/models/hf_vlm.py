"""The trainer's adapter for transformers vision-language models (image-text-to-text).

Any model that loads with ``AutoModelForImageTextToText`` (``AutoModelForVision2Seq`` on older
transformers) and ``AutoProcessor``; tested with Qwen2-VL (``Qwen2VLForConditionalGeneration``, the same
code serves Qwen2.5-VL), LLaVA / LLaVA-NeXT and Idefics3 (``Idefics3ForConditionalGeneration``, SmolVLM v1's
class) through ``hero.testing.tiny_models``.

* Rows: the JSONL format of ``hero.data.jsonl`` (``image`` path, ``question``, ``answer``, ...); the image
  field may also hold a list of images. The trainer formats ``data.prompt_template`` over the row;
  ``prepare_row`` loads the images (a bad one is a one-line ``BadRowError`` naming the row) and downscales
  them to ``max_pixels``.
* Prompts: the processor's chat template, one user turn with the generation prompt: ``[image, ..., text]``,
  or, when the prompt has ``<image>`` placeholders (IMAGE_PLACEHOLDER), the images at those places. A row
  whose image count differs from its placeholders, or with several images for a model type that takes one
  (SINGLE_IMAGE_MODEL_TYPES), is a ``BadRowError``.
* Rollouts: ``model.generate`` (KV cache, ``do_sample``) on the repeated prompts: G completions per prompt.
* Loss inputs: ``hidden_states`` runs the multimodal base model (``model.model``: vision tower, projector
  and language model, no LM head) and returns the language model's last hidden states; the trainer slices
  the completion positions and feeds them with ``lm_head.weight`` to the fused ``hero_loss``, so no logits
  exist for image or prompt tokens. The no-grad old-policy / reference passes take the same route.

Batch layout. The trainer repeats and indexes every tensor of ``encode``'s output along dim 0, so each one
is per prompt row here, and ``_model_inputs`` restores the processor's layout before the model sees it:

* Qwen-style flat ``pixel_values`` ([sum of patches, F], split by ``image_grid_thw``) are packed to
  [B, max patches per row, F];
* with several images in some row, per-image tensors (LLaVA's ``pixel_values`` [images, 3, H, W],
  ``image_grid_thw``, LLaVA-NeXT's ``image_sizes``) are packed to [B, max images per row, ...] under the
  private name ``hero_per_image.<key>`` (with one image per row they already are per row);
* Idefics3's ``pixel_values`` [B, tiles, 3, H, W] and ``pixel_attention_mask`` are per row already (the
  model drops all-zero padding tiles);
* ``*token_type_ids`` ([B, P]) are zero-extended over the completion.

Padding-free (packed) forward (``model.packing``, ``packed_hidden_states``): the rows' attended tokens as one
[1, T] sequence with no attention mask, the image inputs concatenated in row order as in the padded batch (each
model scatters its image features into the image-token positions in flattened order, so row i's images land
in row i's tokens), per-token inputs (``*token_type_ids``) packed like the tokens. Exact where the positions
are per row and transformers separates the rows by them:

* PACKED_1D_MODEL_TYPES (LLaVA, LLaVA-NeXT, Idefics3): 1-D positions over the image-expanded sequence,
  ``0 .. L_i - 1`` per row, as in the padded forward (which passes the same positions);
* PACKED_MROPE_MODEL_TYPES (Qwen2-VL, Qwen2.5-VL): position ids [4, 1, T]: a text row ``0 .. L_i - 1`` per
  row (the language model builds the mask / varlen boundaries from it) over the three M-RoPE rows, computed
  by the model's own ``get_rope_index`` on the padded rows and gathered at the attended tokens.

Other model types stay padded (``packing_unsupported`` says why).

A completion that samples the image placeholder token ends there (it is an end-of-sequence id) and the
placeholder is replaced by pad as an input, so the model never counts more image tokens than it has features.
"""
from __future__ import annotations

import inspect
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hero.rollout import (BadRowError, ModelAdapter, completion_mask_from_eos, packing_attention_unsupported,
                           row_name)

__all__ = ["HFVLMAdapter", "is_vlm_checkpoint", "load_vlm", "freeze_vision_tower", "VISION_MODULE_NAMES",
           "IMAGE_PLACEHOLDER", "SINGLE_IMAGE_MODEL_TYPES", "PACKED_1D_MODEL_TYPES", "PACKED_MROPE_MODEL_TYPES"]

#: attribute names of the vision encoder in transformers VLMs (Qwen2-VL, LLaVA / LLaVA-NeXT, Idefics3 / SmolVLM, ...)
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "vision_encoder")
#: parts of a vision module that stay trainable when it is frozen (the projector into the language model)
_PROJECTOR_PARTS = ("merger",)
#: where a row's images go in its prompt (each becomes the model's own image placeholder via the chat template)
IMAGE_PLACEHOLDER = "<image>"
#: model types whose processors pair exactly one image with each prompt (a row with more is a BadRowError;
#: other processors that refuse several images fail in encode() with a one-line ValueError)
SINGLE_IMAGE_MODEL_TYPES = ("blip", "blip-2", "instructblip", "git", "kosmos-2", "kosmos-2.5", "pix2struct")
#: model types packed with 1-D positions 0..L_i-1 per row over the image-expanded tokens (module docstring)
PACKED_1D_MODEL_TYPES = ("llava", "llava_next", "idefics3")
#: model types packed with per-row M-RoPE ids from their own get_rope_index plus a text-position row
PACKED_MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
#: private keys of encode()'s output (never passed to the model): image placeholder tokens per prompt row,
#: images per row, and the prefix of per-image tensors packed per row
_PRIVATE = "hero_"
_N_IMG = "hero_n_image_tokens"
_N_IMAGES = "hero_n_images"
_PER_IMAGE = "hero_per_image."


def _pad_split(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """x [sum sizes, ...] -> [len(sizes), max sizes, ...]: row i holds its sizes[i] entries, zeros after."""
    out = x.new_zeros(len(sizes), max(sizes), *x.shape[1:])
    for i, part in enumerate(torch.split(x, list(sizes))):
        out[i, : sizes[i]] = part
    return out


def _auto_model_classes():
    import transformers

    return [getattr(transformers, n) for n in ("AutoModelForImageTextToText", "AutoModelForVision2Seq")
            if hasattr(transformers, n)]


def is_vlm_checkpoint(name: str) -> bool:
    """True when ``name`` (local folder or hub id) has a config that maps to an image-text-to-text model class."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 - no loadable config: the causal-LM path reports the error
        return False
    return any(type(cfg) in cls._model_mapping for cls in _auto_model_classes())


def freeze_vision_tower(model: nn.Module) -> int:
    """requires_grad=False on the vision encoder (projector / merger stay trainable); returns #params frozen."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    n = 0
    for owner in (base, model):
        for name in VISION_MODULE_NAMES:
            mod = getattr(owner, name, None)
            if not isinstance(mod, nn.Module):
                continue
            for pname, p in mod.named_parameters():
                if p.requires_grad and not any(part in pname.split(".") for part in _PROJECTOR_PARTS):
                    p.requires_grad_(False)
                    n += p.numel()
    if n == 0:
        raise ValueError(f"model.freeze_vision: no vision encoder found on {type(model).__name__} (looked for "
                         f"{', '.join(VISION_MODULE_NAMES)}); set model.freeze_vision false")
    return n


def load_vlm(path: str, *, attn_implementation: str, dtype: torch.dtype, freeze_vision: bool = True,
             max_pixels: int = 0, image_field: str = "image"):
    """(model, HFVLMAdapter) from a local folder or hub id (``hero.config.ModelConfig`` has the options)."""
    from hero.testing.tiny_models import load_processor

    if not image_field:
        raise ValueError(f"model.name {path!r} is a vision-language model but data.image_field is empty: set it to "
                         "the rows' image field (default 'image')")

    errors = []
    model = None
    for cls in _auto_model_classes():
        try:
            model = cls.from_pretrained(path, attn_implementation=attn_implementation, dtype=dtype)
            break
        except ValueError as e:  # an unknown config for this auto class: try the next one
            errors.append(f"{cls.__name__}: {e}")
    if model is None:
        raise ValueError(f"model.name {path!r} is not an image-text-to-text model ({'; '.join(errors)})")
    if freeze_vision:
        freeze_vision_tower(model)
    adapter = HFVLMAdapter(load_processor(path), model, image_field=image_field, max_pixels=max_pixels,
                           source=path)
    return model, adapter


def _takes_text_positions(lm: nn.Module) -> bool:
    """Whether a Qwen-VL language model reads row 0 of [4, B, T] position ids as text positions for its mask
    (transformers has no flag for it: its forward's source names them ``text_position_ids``)."""
    try:
        return "text_position_ids" in inspect.getsource(type(lm).forward)
    except (OSError, TypeError):  # no source available: cannot tell, so do not pack
        return False


class HFVLMAdapter(ModelAdapter):
    """transformers image-text-to-text model + its processor (see the module docstring)."""

    uses_images = True

    def __init__(self, processor, model: nn.Module, image_field: str = "image", max_pixels: int = 0,
                 source: Optional[str] = None):
        tok = getattr(processor, "tokenizer", None)
        if tok is None or getattr(processor, "image_processor", None) is None:
            raise ValueError(f"{type(processor).__name__} has no tokenizer / image processor: not a VLM processor")
        if not getattr(processor, "chat_template", None) and not getattr(tok, "chat_template", None):
            raise ValueError(f"the processor of {source or type(model).__name__} has no chat template: add "
                             "chat_template.jinja to the model folder")
        self.processor, self.tokenizer = processor, tok
        self.image_field, self.max_pixels, self.source = image_field, int(max_pixels), source
        cfg = model.config
        self.model_type = getattr(cfg, "model_type", type(model).__name__)
        self.image_token_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
        if self.image_token_id is None:
            raise ValueError(f"{type(model).__name__}'s config names no image token (image_token_id)")
        eos = [getattr(tok, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)]
        eos_ids: List[int] = []
        for e in eos:
            for i in (e if isinstance(e, (list, tuple)) else [e]):
                if i is not None and int(i) not in eos_ids:
                    eos_ids.append(int(i))
        if not eos_ids:
            raise ValueError("the tokenizer has no eos_token_id; completions need an end-of-sequence token")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
        # a sampled image placeholder ends the completion (see the module docstring)
        self.eos_token_ids = eos_ids + [int(self.image_token_id)]
        self._set_processor_max_pixels()

    def _set_processor_max_pixels(self) -> None:
        """Qwen-style processors resize to a pixel budget: cap it (``size.longest_edge`` in transformers 5).
        Idefics3-style ones resize every image to ``size.longest_edge`` and split it into tiles of
        ``max_image_size.longest_edge``: cap that edge to the whole tiles within sqrt(max_pixels), at least one."""
        ip = self.processor.image_processor
        if self.max_pixels <= 0:
            return
        size = getattr(ip, "size", None)  # a dict, or transformers 5's SizeDict (item access, not a dict)
        if size is None or not hasattr(size, "__setitem__") or size.get("longest_edge") is None:
            size = None
        tile = getattr(ip, "max_image_size", None)
        if size is not None and isinstance(tile, dict) and "longest_edge" in tile:
            t = int(tile["longest_edge"])
            size["longest_edge"] = min(int(size["longest_edge"]), max(t, int(self.max_pixels ** 0.5) // t * t))
            return
        if size is not None and hasattr(ip, "merge_size"):
            size["longest_edge"] = min(int(size["longest_edge"]), self.max_pixels)
            size["shortest_edge"] = min(int(size.get("shortest_edge", 0)), size["longest_edge"])
        if hasattr(ip, "max_pixels"):
            ip.max_pixels = self.max_pixels

    # ------------------------------------------------------------------ rows -> tensors
    def prepare_row(self, row, prompt, index):
        name = row_name(row, index)
        if self.image_field not in row or row[self.image_field] is None:
            raise BadRowError(f"row {name} has no image field {self.image_field!r}", name)
        value = row[self.image_field]
        images = self._row_images(row)
        self._check_image_count(len(images), prompt, name)
        arrays = []
        for k, img in enumerate(images):
            try:
                arrays.append(self._load_image(img))
            except Exception as e:  # noqa: BLE001 - PIL and numpy raise many types for a broken image
                which = "image" if len(images) == 1 else f"image {k}"
                raise BadRowError(f"row {name}: {which} does not load ({type(e).__name__}: {e})", name) from None
        new = dict(row)
        new[self.image_field] = arrays if isinstance(value, (list, tuple)) else arrays[0]
        return new

    def _check_image_count(self, n: int, prompt: str, name: str) -> None:
        """BadRowError unless the row's ``n`` images suit the model and the prompt's IMAGE_PLACEHOLDERs."""
        if n == 0:
            raise BadRowError(f"row {name}: field {self.image_field!r} is an empty list; give at least one image", name)
        if n > 1 and self.model_type in SINGLE_IMAGE_MODEL_TYPES:
            raise BadRowError(f"row {name} has {n} images but {self.model_type} models take one image per prompt: "
                              "keep one image per row", name)
        marks = prompt.count(IMAGE_PLACEHOLDER)
        if marks and marks != n:
            raise BadRowError(f"row {name} has {n} image(s) but its prompt has {marks} {IMAGE_PLACEHOLDER} "
                              "placeholder(s): write one per image, or none to put all images before the text", name)

    def _load_image(self, img) -> np.ndarray:
        """A path / bytes / PIL image / array -> uint8 [H, W, 3], downscaled to max_pixels."""
        if isinstance(img, (str, bytes)) or hasattr(img, "__fspath__"):
            from hero.data.jsonl import load_image

            img = load_image(img, "RGB")
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"expected uint8 [H, W] or [H, W, 3], got {arr.dtype} {arr.shape}")
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return self._limit_pixels(arr)

    def _limit_pixels(self, arr: np.ndarray) -> np.ndarray:
        h, w = arr.shape[:2]
        if self.max_pixels <= 0 or h * w <= self.max_pixels:
            return arr
        from PIL import Image

        s = (self.max_pixels / (h * w)) ** 0.5
        size = (max(1, int(w * s)), max(1, int(h * s)))
        return np.asarray(Image.fromarray(arr).resize(size, Image.BICUBIC))

    def _row_images(self, row) -> list:
        value = row[self.image_field]
        return list(value) if isinstance(value, (list, tuple)) else [value]

    @staticmethod
    def _content(prompt: str, n_images: int) -> List[Dict[str, str]]:
        """One user turn: images where the prompt has IMAGE_PLACEHOLDERs, else all of them before the text."""
        if IMAGE_PLACEHOLDER not in prompt:
            return [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        content: List[Dict[str, str]] = []
        for k, part in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if k:
                content.append({"type": "image"})
            if part:
                content.append({"type": "text", "text": part})
        return content

    def encode(self, rows, prompts):
        images = [self._row_images(r) for r in rows]
        msgs = [[{"role": "user", "content": self._content(p, len(im))}] for p, im in zip(prompts, images)]
        text = self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        flat = [im for row_images in images for im in row_images]
        try:
            enc = self.processor(images=flat, text=text, return_tensors="pt", padding=True, padding_side="left")
        except Exception as e:  # noqa: BLE001 - processors raise ValueError / IndexError / TypeError on layouts
            if len(flat) == len(rows):
                raise
            raise ValueError(f"{type(self.processor).__name__} failed on rows with {[len(im) for im in images]} "
                             f"images ({type(e).__name__}: {e}); keep one image per row for this model") from e
        n_images = torch.tensor([len(im) for im in images])
        out = self._per_row({k: v for k, v in enc.items() if isinstance(v, Tensor)}, n_images)
        out[_N_IMAGES] = n_images
        out[_N_IMG] = (out["input_ids"] == self.image_token_id).sum(1)
        return out

    @staticmethod
    def _per_row(enc: Dict[str, Tensor], n_images: Tensor) -> Dict[str, Tensor]:
        """Every tensor per prompt row on dim 0 (module docstring): Qwen's flat patches [sum n, F] -> [B, max n, F];
        with several images in a row, per-image tensors [sum k, ...] -> [B, max k, ...] named _PER_IMAGE + key."""
        B, total = enc["input_ids"].shape[0], int(n_images.sum())
        out = dict(enc)
        pv, grid = out.get("pixel_values"), out.get("image_grid_thw")
        if pv is not None and grid is not None and grid.shape[0] == total and pv.shape[0] == int(grid.prod(-1).sum()):
            patches = [int(g.prod(-1).sum()) for g in torch.split(grid, n_images.tolist())]
            out["pixel_values"] = _pad_split(pv, patches)
        elif pv is not None and pv.shape[0] not in (B, total):
            raise ValueError(f"pixel_values has {pv.shape[0]} rows for {B} prompts with {total} images and no "
                             "image_grid_thw to split them")
        if total != B:  # (one image per row: per-image tensors are already per row)
            qwen_patches = "pixel_values" if grid is not None else None  # packed per row above
            for k in [k for k, v in out.items() if v.shape[0] == total and k != qwen_patches]:
                out[_PER_IMAGE + k] = _pad_split(out.pop(k), n_images.tolist())
        return out

    def _model_inputs(self, extra: Dict[str, Tensor], seq_len: int) -> Dict[str, Any]:
        """Per-row tensors of encode() -> the model's inputs for sequences of ``seq_len`` tokens."""
        n_images = extra.get(_N_IMAGES)
        counts = n_images.tolist() if n_images is not None else None
        out = {k: v for k, v in extra.items() if not k.startswith(_PRIVATE)}
        for k, v in extra.items():
            if k.startswith(_PER_IMAGE):
                out[k[len(_PER_IMAGE):]] = torch.cat([v[i, :n] for i, n in enumerate(counts)])
        grid, pv = out.get("image_grid_thw"), out.get("pixel_values")
        if pv is not None and grid is not None and pv.dim() == 3 and grid.dim() == 2:  # Qwen patches per row
            patches = [int(g.prod(-1).sum()) for g in torch.split(grid, counts or [1] * pv.shape[0])]
            out["pixel_values"] = torch.cat([pv[i, :n] for i, n in enumerate(patches)])
        for k, v in list(out.items()):
            if k.endswith("token_type_ids") and v.dim() == 2 and v.shape[1] < seq_len:
                out[k] = torch.cat([v, v.new_zeros(v.shape[0], seq_len - v.shape[1])], 1)
        return out

    # ------------------------------------------------------------------ model calls
    def generate(self, model, inputs, *, max_new_tokens, temperature, top_p=1.0, top_k=0):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = model.generate(
            input_ids=ids, attention_mask=mask, **self._model_inputs(extra, ids.shape[1]), do_sample=True,
            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k), max_new_tokens=int(max_new_tokens),
            use_cache=True, pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids,
        )
        seq = out if isinstance(out, Tensor) else out.sequences
        comp = seq[:, ids.shape[1]:]
        if comp.shape[1] == 0:
            raise RuntimeError("generate returned no new tokens")
        return comp, completion_mask_from_eos(comp, self.eos_token_ids)

    def _drop_stray_images(self, input_ids: Tensor, extra: Dict[str, Tensor]) -> Tensor:
        """[m, L] ids with image placeholders sampled in the completion replaced by pad (module docstring)."""
        n_img = extra.get(_N_IMG)
        if n_img is None:
            return input_ids
        is_img = input_ids == self.image_token_id
        stray = is_img & (is_img.long().cumsum(1) > n_img.view(-1, 1))
        return input_ids.masked_fill(stray, self.pad_token_id)

    @staticmethod
    def _base(model: nn.Module) -> nn.Module:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
        if base is None or base is model:
            raise TypeError(f"cannot find the multimodal base model of {type(model).__name__} (model.model)")
        return base

    def hidden_states(self, model, input_ids, attention_mask, **extra):
        input_ids = self._drop_stray_images(input_ids, extra)
        inputs = self._model_inputs(extra, input_ids.shape[1])
        if self.model_type in PACKED_1D_MODEL_TYPES:  # positions count real tokens only (= the packed layout's)
            inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        out = self._base(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def packing_unsupported(self, model):
        why = packing_attention_unsupported(model)
        if why:
            return why
        if self.model_type not in PACKED_1D_MODEL_TYPES + PACKED_MROPE_MODEL_TYPES:
            return (f"packing is verified only for {', '.join(PACKED_1D_MODEL_TYPES + PACKED_MROPE_MODEL_TYPES)}; "
                    f"{self.model_type} models may position or mask image tokens otherwise")
        base = self._base(model)
        lm = next((getattr(base, n) for n in ("language_model", "text_model") if hasattr(base, n)), None)
        if lm is None or not hasattr(sys.modules.get(type(lm).__module__), "create_causal_mask"):
            return (f"the language model of {type(model).__name__} does not build its attention mask with "
                    "transformers.masking_utils, so packed rows could attend to each other")
        if self.model_type in PACKED_MROPE_MODEL_TYPES and not (hasattr(base, "get_rope_index")
                                                                and _takes_text_positions(lm)):
            return (f"{type(lm).__name__} in this transformers version takes no text-position row in its position "
                    "ids ([4, 1, T]), which packed M-RoPE rows need to keep apart")
        return None

    def packed_hidden_states(self, model, input_ids, position_ids, padded_mask=None, **extra):
        if padded_mask is None:
            raise ValueError("HFVLMAdapter.packed_hidden_states needs padded_mask (the rows' padded attention mask)")
        keep = padded_mask.bool()
        padded = input_ids.new_full(keep.shape, self.pad_token_id).masked_scatter(keep, input_ids)
        padded = self._drop_stray_images(padded, extra)
        inputs = self._model_inputs(extra, keep.shape[1])
        base = self._base(model)
        if self.model_type in PACKED_MROPE_MODEL_TYPES:
            position_ids = torch.cat([position_ids[None], self._mrope_positions(base, padded, padded_mask, inputs)])
        for k, v in list(inputs.items()):  # per-token inputs in the padded layout: pack them like the tokens
            if isinstance(v, Tensor) and v.shape == keep.shape:
                inputs[k] = v[keep][None]
        out = base(input_ids=padded[keep][None], attention_mask=None, position_ids=position_ids, use_cache=False,
                   **inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    @staticmethod
    def _mrope_positions(base: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                         inputs: Dict[str, Any]) -> Tensor:
        """The model's own M-RoPE ids of the padded rows ([3, m, L], as its padded forward computes them) at the
        attended tokens, in row order: [3, 1, T]."""
        params = inspect.signature(base.get_rope_index).parameters
        kw = {k: v for k, v in inputs.items() if k in params and k not in ("input_ids", "attention_mask")}
        pos, _ = base.get_rope_index(input_ids=input_ids, attention_mask=attention_mask, **kw)
        return pos[:, attention_mask.bool()][:, None]

    def decode(self, ids, mask):
        return self.tokenizer.batch_decode((ids * mask + self.pad_token_id * (1 - mask)).tolist(),
                                           skip_special_tokens=True)

    def save_pretrained(self, model, path):
        model.save_pretrained(path)
        self.processor.save_pretrained(path)
        # the image-only fallback processor writes no video config: carry the source's over (full AutoProcessor)
        if self.source and os.path.isdir(self.source):
            for name in ("video_preprocessor_config.json",):
                src, dst = os.path.join(self.source, name), os.path.join(path, name)
                if os.path.isfile(src) and not os.path.exists(dst):
                    shutil.copyfile(src, dst)
