"""Tiny random-init transformers models + processors, written to a folder with no download.

::

    python -m hero.testing.tiny_models --family qwen2_vl --out /tmp/tiny-qwen2vl
    hero train --config configs/vlm_tiny.yaml --model.name /tmp/tiny-qwen2vl

Families (real transformers classes, loadable with ``from_pretrained(DIR)``):

* ``qwen2_vl`` / ``qwen2_5_vl``: ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` +
  their processor (``Qwen2VLImageProcessor`` config, ``max_pixels`` small so an image is a handful of tokens);
* ``llava``: ``LlavaForConditionalGeneration`` (CLIP vision tower + Llama) + ``LlavaProcessor``
  (``CLIPImageProcessor``, 28 x 28 input, 4 image tokens);
* ``llava_next``: ``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor`` (any-resolution tiles of 28 x 28);
* ``idefics3``: ``Idefics3ForConditionalGeneration`` (SmolVLM v1's class; SmolVLM2 has its own ``smolvlm`` type)
  + ``Idefics3Processor`` with the PIL ``Idefics3ImageProcessorPil`` (no torchvision): images resized to a
  112-pixel longest edge and split into 56 x 56 tiles plus a global view, 4 ``<image>`` tokens per tile;
* ``llama``: ``LlamaForCausalLM`` + tokenizer (text only);
* ``qwen2``: ``Qwen2ForCausalLM`` + the Qwen tokenizer (text only).

The tokenizer is built with the ``tokenizers`` library: byte-level BPE with the 256 byte symbols, no merges
(every UTF-8 byte is a token, so any text round-trips) plus the family's special tokens, wrapped in
``PreTrainedTokenizerFast``; the chat template is a minimal version of the family's own.

torchvision and the Qwen2-VL processor
---------------------------------------
transformers 5.x gives ``Qwen2VLProcessor`` a required video processor, and every video processor needs
torchvision (on CPU-only torch 2.13 there is no matching torchvision wheel). Without torchvision,
``AutoProcessor.from_pretrained(DIR)`` fails for Qwen2-VL (``VIDEO_PROCESSOR_MAPPING`` has no
``_extra_content``) although images alone need nothing of it. ``load_processor(path)`` tries
``AutoProcessor`` first and, when that fails with torchvision missing, builds the same processor class
without the video processor (``image_only_processor``): the image processor (PIL backend), the tokenizer
and the chat template, every image code path unchanged. The folder written here also has a
``video_preprocessor_config.json``, so with torchvision installed ``AutoProcessor.from_pretrained(DIR)``
loads the full processor. Use ``load_processor`` wherever a VLM processor is loaded (the trainer does).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

__all__ = ["FAMILIES", "build_tokenizer", "build_tiny_model", "write_tiny_model", "load_processor",
           "image_only_processor", "main"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "idefics3", "llama", "qwen2")

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_LLAVA_SPECIALS = ["<s>", "</s>", "<pad>", "<image>"]
# Idefics3 / SmolVLM: the processor spells an image as <fake_token_around_image> (<row_i_col_j> <image>*n)* ...
# <global-img> <image>*n <fake_token_around_image>; each of these is one token in the real vocabularies
_IDEFICS3_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                       "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])

# Minimal chat templates of each family: one or more turns, images as the family's placeholder.
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_IDEFICS3_TEMPLATE = (  # SmolVLM's: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:"
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tokenizer(family: str):
    """Byte-level BPE tokenizer (no merges, no download) with the family's special tokens -> PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if family.startswith("llava") or family == "llama":
        tk.add_special_tokens(_LLAVA_SPECIALS if family != "llama" else _LLAVA_SPECIALS[:3])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      chat_template=_LLAVA_TEMPLATE)
        if family != "llama":
            tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        return tok
    if family == "idefics3":
        tk.add_special_tokens(_IDEFICS3_SPECIALS)
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                      pad_token="<|endoftext|>", chat_template=_IDEFICS3_TEMPLATE)
        tok.add_special_tokens({"additional_special_tokens": _IDEFICS3_SPECIALS[1:]})
        return tok
    tk.add_special_tokens(_QWEN_SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=_QWEN_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": _QWEN_SPECIALS[1:]})
    return tok


def _llama_text_config(V: int, hidden: int, layers: int, tok, cls=None, **extra):
    from transformers import LlamaConfig

    cls = cls or LlamaConfig
    return cls(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               tie_word_embeddings=False, **extra)


def _qwen_image_processor(max_pixels: int):
    """Qwen2-VL's image processor (PIL backend: works without torchvision), a small pixel budget."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, merge_size=2,
                                    temporal_patch_size=2)


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=28, patch_size=14, projection_dim=32)


def _build_llava(family: str, tok, V: int, hidden: int, layers: int, max_pixels: int):
    """LLaVA-1.5 (28 x 28 CLIP input, 4 image tokens) or LLaVA-NeXT (any-resolution tiles of 28 x 28)."""
    import transformers

    text = _llama_text_config(V, hidden, layers, tok)
    common = dict(vision_config=_clip_vision_config(), text_config=text, vision_feature_layer=-1,
                  image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                  tie_word_embeddings=False)
    proc_kw = dict(tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=_LLAVA_TEMPLATE)
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**common))
        ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return model, transformers.LlavaProcessor(image_processor=ip, **proc_kw)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [[28, 56], [56, 28], [56, 56]]
    model = transformers.LlavaNextForConditionalGeneration(
        transformers.LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                    image_grid_pinpoints=pinpoints)
    return model, transformers.LlavaNextProcessor(image_processor=ip, **proc_kw)


def _build_qwen(family: str, tok, V: int, hidden: int, layers: int, max_pixels: int):
    """Qwen2-VL or Qwen2.5-VL: a 1-block vision tower, M-RoPE text model; processor without video."""
    import transformers

    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    head_dim = hidden // 4
    q = head_dim // 2 - 2 * (head_dim // 8)  # mrope sections (t, h, w) sum to head_dim / 2
    text = dict(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=None,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [q, head_dim // 8, head_dim // 8]})
    vision = dict(depth=1, hidden_size=hidden, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision["embed_dim"] = 32
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
    else:  # Qwen2.5-VL's tower: hidden_size is its width, out_hidden_size the language model's
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=56,
                      fullatt_block_indexes=[0])
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    cfg_cls, model_cls, proc_cls = (getattr(transformers, n) for n in names)
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                  video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    proc = image_only_processor(proc_cls, _qwen_image_processor(max_pixels), tok, _QWEN_TEMPLATE)
    return model_cls(cfg), proc


def _build_idefics3(tok, V: int, hidden: int, layers: int, max_pixels: int):
    """Idefics3 (SmolVLM v1's class): SigLIP-style tower on 56 x 56 tiles, pixel shuffle 2 -> 4 tokens per tile;
    images are resized to a longest edge of 2 tiles and split into up to 2 x 2 tiles plus a global view."""
    import transformers
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tile = 56
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=tile,
                  patch_size=14)
    cfg = transformers.Idefics3Config(vision_config=vision, text_config=_llama_text_config(V, hidden, layers, tok),
                                      image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile})
    proc = transformers.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=(tile // 14 // 2) ** 2,
                                          chat_template=_IDEFICS3_TEMPLATE)
    return transformers.Idefics3ForConditionalGeneration(cfg), proc


def build_tiny_model(family: str, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                     max_pixels: int = 56 * 56) -> Tuple[torch.nn.Module, Any]:
    """(random-init model, processor or tokenizer) of ``family``; the global torch RNG is left untouched."""
    from transformers import LlamaForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    tok = build_tokenizer(family)
    V = (len(tok) + 63) // 64 * 64  # pad the vocabulary like real checkpoints do (sampled pads decode to "")
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's CPU RNG stream is untouched
        torch.manual_seed(seed)
        if family == "llama":
            model, proc = LlamaForCausalLM(_llama_text_config(V, hidden_size, num_layers, tok)), tok
        elif family == "qwen2":
            from transformers import Qwen2Config, Qwen2ForCausalLM

            model, proc = Qwen2ForCausalLM(_llama_text_config(V, hidden_size, num_layers, tok, cls=Qwen2Config)), tok
        elif family.startswith("llava"):
            model, proc = _build_llava(family, tok, V, hidden_size, num_layers, max_pixels)
        elif family == "idefics3":
            model, proc = _build_idefics3(tok, V, hidden_size, num_layers, max_pixels)
        else:
            model, proc = _build_qwen(family, tok, V, hidden_size, num_layers, max_pixels)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, proc


def _processor_cls(name: str):
    import transformers

    return getattr(transformers, name)


def image_only_processor(cls, image_processor, tokenizer, chat_template: Optional[str] = None, **kwargs):
    """An instance of processor class ``cls`` with its image processor and tokenizer but no video processor.

    The subclass keeps ``cls``'s name, so ``save_pretrained`` writes ``processor_class: <cls name>`` and a
    full ``AutoProcessor`` load works wherever torchvision is installed."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
        # the base __init__ passes video_processor=None positionally; get_attributes() below (from this
        # signature) has no video_processor, so ProcessorMixin drops it instead of type-checking it
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kw)

    sub = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                      "__doc__": f"{cls.__name__} without a video processor (no torchvision)."})
    return sub(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def _read_json(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_processor(path: str):
    """``AutoProcessor.from_pretrained(path)``; when that fails and torchvision is missing, the same processor
    class without its video processor (see the module docstring). A text-only folder gives its tokenizer."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - the video-processor failure surfaces as several error types
        if importlib.util.find_spec("torchvision") is not None:
            raise
        cfg_path = os.path.join(path, "processor_config.json")
        if not os.path.isfile(cfg_path):
            raise
        name = _read_json(cfg_path).get("processor_class")
        cls = _processor_cls(name) if name else None
        if cls is None:
            raise
        first = e
    kwargs = {k: v for k, v in _read_json(cfg_path).items()
              if k not in ("processor_class", "image_processor", "video_processor", "auto_map")
              and not isinstance(v, dict)}
    tmpl = os.path.join(path, "chat_template.jinja")
    template = open(tmpl, encoding="utf-8").read() if os.path.isfile(tmpl) else None
    try:
        return image_only_processor(cls, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                    template, **kwargs)
    except Exception as e2:
        raise RuntimeError(f"load_processor({path!r}): AutoProcessor failed ({type(first).__name__}: {first}) and so "
                           f"did the image-only fallback ({type(e2).__name__}: {e2})") from e2


def _video_config(image_processor) -> Dict[str, Any]:
    """video_preprocessor_config.json for Qwen2-VL (what AutoProcessor needs with torchvision installed)."""
    ip = image_processor
    return {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": ip.patch_size, "merge_size": ip.merge_size,
            "temporal_patch_size": ip.temporal_patch_size, "size": dict(ip.size), "image_mean": list(ip.image_mean), "image_std": list(ip.image_std)}


def write_tiny_model(family: str, out: str, **kw) -> str:
    """Build ``family`` (see ``build_tiny_model``) and save model + processor/tokenizer into ``out``."""
    model, proc = build_tiny_model(family, **kw)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        with open(os.path.join(out, "video_preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(_video_config(proc.image_processor), f, indent=2)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hero.testing.tiny_models", description=__doc__.split("\n\n")[0])
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=56 * 56, help="qwen2_vl: image size cap (pixels)")
    a = p.parse_args(argv)
    write_tiny_model(a.family, a.out, hidden_size=a.hidden_size, num_layers=a.num_layers, seed=a.seed,
                     max_pixels=a.max_pixels)
    print(f"wrote a tiny {a.family} model to {a.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
