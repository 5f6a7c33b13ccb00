"""The confidence-trap diagnosis: does a VLM stay confident (low answer-token entropy) while its accuracy
collapses as the image gets noisier?

For each noise level sigma (Gaussian pixel noise, 0..255 scale, seeded per example) the model answers every
question; at the *answer token position* we take the full next-token distribution (whole vocabulary, raw
logits, temperature 1) and record its entropy H in nats and the confidence (probability of the emitted
answer token). Per sigma we report: accuracy, mean/median H, accuracy per entropy bin (``H <= 0.3`` ...),
ECE with a reliability table, POPE metrics per split (when answers are yes/no), the unparsed count, and
"trap" indicators: the share of answers with H <= ``low_entropy`` and the share of *errors* made at
H <= ``low_entropy`` (confidently wrong).

Models plug in through an adapter with one method::

    adapter.answer_token_distribution(images, questions) -> AnswerBatch

``TinyVLMAdapter`` wraps ``hero.experiments.confidence_trap.tiny_vlm.TinyVLM``; ``HFVLMAdapter`` wraps any
transformers image-text-to-text model + processor through the trainer's ``hero.models.hf_vlm.HFVLMAdapter``
(tested on tiny random-init Qwen2-VL and LLaVA from ``hero.testing.tiny_models``).

Both adapters decode greedily, or with visual contrastive decoding (``vcd=VCDConfig(...)``, see
``hero.experiments.confidence_trap.vcd``): then the answer distribution, its entropy and the confidence are
those of the contrastive logits the answer was picked from.

Entropy uses ``hero_kernels.reference.entropy_logprob`` (float64) by default, imported lazily, or any
callable ``entropy_fn(logits [B, V]) -> H [B]``. Nothing here imports triton.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from hero.io import atomic_write_bytes, json_safe, write_json

from .digits_pope import sigma_key
from .metrics import (
    ENTROPY_EDGES,
    UNPARSED,
    accuracy_by_entropy_bin,
    chair,
    expected_calibration_error,
    mentioned_digits,
    normalize_yes_no,
    parse_answer,
    pope_metrics_by_split,
    reliability_bins,
)
from .vcd import (VCDConfig, VCDLogitsProcessor, contrastive_logits, diffusion_noise, distort_rows, tiny_vlm_branch,
                  vcd_decode)

__all__ = [
    "AnswerBatch",
    "VLMAdapter",
    "TinyVLMAdapter",
    "HFVLMAdapter",
    "Diagnosis",
    "diagnose",
    "reference_entropy",
]

EntropyFn = Callable[[Tensor], Tensor]


def reference_entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) per row: logits [B, V] -> [B] float64 (hero_kernels reference)."""
    from hero_kernels.reference import entropy_logprob

    labels = logits.argmax(-1)  # any valid label; only H is used
    _, H, _ = entropy_logprob(logits, labels)
    return H


@dataclass
class AnswerBatch:
    """One adapter call's results, all of length B.

    texts: generated text; predictions: parsed answers ("yes"/"no"/free text/"unparsed");
    entropy: [B] nats of the full next-token distribution at the answer position;
    confidence: [B] probability of the token emitted there (for a forced position: the max probability);
    answer_found: [B] True when the answer position was found in the generated text, False when it was
    forced (tiny VLM: "<answer>" appended to the output) or a fallback (HF: first generated token).
    """

    texts: List[str]
    predictions: List[str]
    entropy: np.ndarray
    confidence: np.ndarray
    answer_found: np.ndarray


class VLMAdapter(Protocol):
    name: str

    def answer_token_distribution(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> AnswerBatch:
        ...


def _entropy_np(fn: Optional[EntropyFn], logits: Tensor) -> np.ndarray:
    H = (fn or reference_entropy)(logits.detach())
    H = np.asarray(H.detach().double().cpu().numpy() if isinstance(H, Tensor) else H, dtype=np.float64)
    if H.shape != (logits.shape[0],):
        raise ValueError(f"entropy_fn must return shape [{logits.shape[0]}], got {H.shape}")
    return H


def _answer_batch(texts: List[str], parse_mode: str, entropy_fn: Optional[EntropyFn], ans_logits: Tensor,
                  conf: Tensor, found: np.ndarray) -> "AnswerBatch":
    """An adapter's answers: texts [B], answer-step logits [B, V], confidence of the answer token [B], found [B]."""
    return AnswerBatch(texts=texts, predictions=[parse_answer(t, parse_mode) for t in texts],
                       entropy=_entropy_np(entropy_fn, ans_logits),
                       confidence=conf.cpu().numpy().astype(np.float64), answer_found=found)


class TinyVLMAdapter:
    """Adapter for ``hero.experiments.confidence_trap.tiny_vlm.TinyVLM`` trained on ``<think>...</think><answer>...</answer>`` outputs.

    Greedy decoding (or sampling with ``temperature`` > 0 and a seeded generator, or VCD with ``vcd``: two
    KV-cached branches, clean and distorted image, in lockstep). The answer position is the
    token right after the last ``<answer>`` token in the output; when the output has none (or ends on it),
    the output (without eos) + ``<answer>`` is run through the model and its next-token distribution is
    used (the prediction stays whatever ``parse_answer`` says, usually "unparsed", so it counts as wrong).
    """

    name = "tiny-vlm"

    def __init__(self, model, processor, *, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                 entropy_fn: Optional[EntropyFn] = None, parse_mode: str = "tag", vcd: Optional[VCDConfig] = None):
        if vcd is not None and temperature > 0:
            raise ValueError("VCD decodes greedily: use temperature 0 with vcd")
        self.vcd = vcd
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.entropy_fn = entropy_fn
        self.parse_mode = parse_mode
        self.answer_id = processor.tokenizer.convert_tokens_to_ids("<answer>")

    @torch.no_grad()
    def answer_token_distribution(self, images, questions) -> AnswerBatch:
        model, proc, tok = self.model, self.processor, self.processor.tokenizer
        dev = model.device
        inputs = {k: v.to(dev) for k, v in proc(images, questions).items()}
        noisy = None if self.vcd is None else diffusion_noise(inputs["pixel_values"], self.vcd.noise_steps,
                                                              self.vcd.seed, self.vcd.schedule)
        out = self._decode(inputs, noisy)
        B = len(questions)
        V = out.logits.shape[-1]
        ans_logits = torch.empty(B, V, dtype=torch.float32, device=dev)
        emitted = torch.full((B,), -1, dtype=torch.long, device=dev)
        found = np.zeros(B, dtype=bool)
        texts, forced_rows, forced_seqs = [], [], []
        lengths = out.completion_mask.sum(1).tolist()
        for i in range(B):
            seq = out.sequences[i, : lengths[i]].tolist()
            texts.append(tok.decode(seq, skip_special_tokens=True))
            pos = [t for t, x in enumerate(seq) if x == self.answer_id and t + 1 < len(seq)]
            if pos:
                t = pos[-1] + 1
                ans_logits[i] = out.logits[i, t]
                emitted[i] = seq[t]
                found[i] = True
            else:
                # drop eos, and any sampled <image> token: as input it would be taken for an image placeholder
                body = [x for x in seq if x not in (tok.eos_token_id, tok.image_token_id)]
                if not body or body[-1] != self.answer_id:
                    body = body + [self.answer_id]
                forced_rows.append(i)
                forced_seqs.append(proc.prompt_ids(questions[i]) + body)
        if forced_rows:
            ids, mask = tok.pad(forced_seqs, "left")
            ids, mask = ids.to(dev), mask.to(dev)
            z = self._last_logits(ids, mask, inputs["pixel_values"][forced_rows])
            if noisy is not None:
                zd = self._last_logits(ids, mask, noisy[forced_rows])
                z = contrastive_logits(z, zd, self.vcd.alpha, self.vcd.beta)
            ans_logits[forced_rows] = z
        probs = ans_logits.double().softmax(-1)
        conf = torch.where(emitted >= 0, probs.gather(1, emitted.clamp_min(0)[:, None])[:, 0], probs.max(-1).values)
        return _answer_batch(texts, self.parse_mode, self.entropy_fn, ans_logits, conf, found)

    def _decode(self, inputs: Dict[str, Tensor], noisy: Optional[Tensor]):
        """Greedy / sampled generate, or VCD against the distorted pixel values ``noisy``: an object with
        sequences, completion_mask [B, T] and logits [B, T, V] (those the tokens were picked from)."""
        model = self.model
        if noisy is None:
            gen = torch.Generator(device=model.device).manual_seed(self.seed) if self.temperature > 0 else None
            return model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0,
                                  temperature=self.temperature or 1.0, generator=gen, output_logits=True)
        from .tiny_vlm import TinyGenerateOutput

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        seq, cmask, logits = vcd_decode(tiny_vlm_branch(model, ids, mask, inputs["pixel_values"]),
                                        tiny_vlm_branch(model, ids, mask, noisy), self.vcd, self.max_new_tokens,
                                        [model.config.eos_token_id], model.config.pad_token_id)
        return TinyGenerateOutput(sequences=seq, completion_mask=cmask, logits=logits)

    def _last_logits(self, ids: Tensor, mask: Tensor, pixel_values: Tensor) -> Tensor:
        h = self.model.hidden_states(ids, mask, pixel_values)[:, -1]
        return self.model.get_output_embeddings()(h).float()


class HFVLMAdapter:
    """Adapter for a transformers vision-language model + processor (tested on tiny Qwen2-VL and LLaVA).

    Encoding goes through the trainer's ``hero.models.hf_vlm.HFVLMAdapter`` (``vlm``): its image checks and
    resizing (``prepare_row``), chat template (one user turn [image, text]), per-row tensor layout and eos ids.
    prompt: format string with ``{question}``; ``use_chat_template=False`` feeds it to the processor as is (it
    must then hold the model's image placeholder). Greedy generation of ``max_new_tokens``.
    answer_mode="first_token": the answer position is the first generated token that decodes to non-blank
    text (typical "Answer yes or no." prompting); predictions parsed with ``parse_mode="yesno"``.
    answer_mode="tag": the first token after the text "<answer>" appears (for models trained with the tag);
    predictions parsed with ``parse_mode="tag"``. If the position is not found, step 0 is used and
    ``answer_found`` is False. The answer distribution is the raw logits at that step, the ones the token
    was picked from (generate runs a plain greedy config: the checkpoint's processors such as a repetition
    penalty are not applied), with ``vcd`` their contrast
    ``contrastive_logits(z, z')``; ``vcd`` decodes with one ``generate`` over [clean rows; distorted rows]
    (``hero.experiments.confidence_trap.vcd``: KV cache, eos per row, twice the batch of greedy).
    """

    def __init__(self, model, processor, *, prompt: str = "{question} Answer the question with yes or no.",
                 max_new_tokens: int = 8, answer_mode: str = "first_token", use_chat_template: bool = True,
                 parse_mode: Optional[str] = None, entropy_fn: Optional[EntropyFn] = None, name: Optional[str] = None,
                 vcd: Optional[VCDConfig] = None, vlm=None):
        from hero.models.hf_vlm import HFVLMAdapter as TrainerVLMAdapter

        if answer_mode not in ("first_token", "tag"):
            raise ValueError(f"answer_mode must be 'first_token' or 'tag', got {answer_mode!r}")
        self.vcd = vcd
        self.model = model
        self.vlm = vlm if vlm is not None else TrainerVLMAdapter(processor, model, source=name)
        self.processor = self.vlm.processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.answer_mode = answer_mode
        self.use_chat_template = use_chat_template
        self.parse_mode = parse_mode or ("tag" if answer_mode == "tag" else "yesno")
        self.entropy_fn = entropy_fn
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", "hf-vlm") or "hf-vlm"
        self.tokenizer = self.vlm.tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "cuda", dtype=torch.bfloat16, **kwargs) -> "HFVLMAdapter":
        """Load model + processor with ``hero.models.hf_vlm.load_vlm`` (AutoModelForImageTextToText, the
        processor without its video part when torchvision is missing)."""
        from hero.models.hf_vlm import load_vlm

        model, vlm = load_vlm(name_or_path, attn_implementation="sdpa", dtype=dtype, freeze_vision=False)
        return cls(model.to(device).eval(), vlm.processor, name=name_or_path, vlm=vlm, **kwargs)

    def _encode(self, images: Sequence[np.ndarray], questions: Sequence[str]):
        """(per-row tensors of the prompts in ``hero.models.hf_vlm.HFVLMAdapter.encode``'s layout on the model's
        device, each row's image bytes: the seed of its VCD noise)."""
        from hero.models.hf_vlm import HFVLMAdapter as TrainerVLMAdapter

        field = self.vlm.image_field
        rows = [self.vlm.prepare_row({field: np.asarray(im), "id": str(i)}, "", i) for i, im in enumerate(images)]
        texts = [self.prompt.format(question=q) for q in questions]
        if self.use_chat_template:
            enc = self.vlm.encode(rows, texts)
        else:  # the prompt as is, packed per row like encode()
            out = self.processor(images=[r[field] for r in rows], text=texts, return_tensors="pt", padding=True,
                                 padding_side="left")
            enc = TrainerVLMAdapter._per_row({k: v for k, v in out.items() if isinstance(v, Tensor)},
                                             torch.ones(len(rows), dtype=torch.long))
        keys = [r[field].tobytes() + str(r[field].shape).encode() for r in rows]
        return {k: v.to(self.model.device) for k, v in enc.items()}, keys

    def _distorted(self, enc: Dict[str, Tensor], keys: Sequence[bytes]) -> Tensor:
        """Every row's processed pixel values under the VCD diffusion noise (``vcd.distort_rows``)."""
        pv = enc.get("pixel_values")
        if pv is None:
            raise ValueError("VCD needs the processor's pixel_values; this processor gave " + ", ".join(enc))
        grid = enc.get("image_grid_thw")
        counts = grid.prod(-1).tolist() if grid is not None and pv.dim() == 3 else None
        ip = self.processor.image_processor
        T, P = getattr(ip, "temporal_patch_size", None), getattr(ip, "patch_size", None)
        frames = (int(T), int(P) ** 2) if counts is not None and T and P else None
        return distort_rows(pv, self.vcd, keys, counts, frames)

    def _decode(self, enc: Dict[str, Tensor], keys: Sequence[bytes]):
        """(new tokens [B, T] on CPU, T step logits [B, V]): transformers' greedy generate, or VCD on the
        doubled batch [clean; distorted] (module ``vcd``); the step logits are raw (VCD: their contrast)."""
        B = enc["input_ids"].shape[0]
        procs = None
        if self.vcd is not None:
            noisy = self._distorted(enc, keys)
            enc = {k: torch.cat([v, noisy if k == "pixel_values" else v]) for k, v in enc.items()}
            from transformers import LogitsProcessorList

            procs = LogitsProcessorList([VCDLogitsProcessor(self.vcd.alpha, self.vcd.beta)])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        # Plain greedy: the checkpoint's score processors (e.g. Qwen2-VL's repetition_penalty 1.05) would pick
        # tokens from other scores than the raw logits the diagnosis reports, and generate fills every option
        # a passed config leaves unset from model.generation_config, so that one is swapped for a bare one.
        from transformers import GenerationConfig

        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig(bos_token_id=saved.bos_token_id)
        try:
            gen = self.model.generate(
                input_ids=ids, attention_mask=mask, **self.vlm._model_inputs(extra, ids.shape[1]), do_sample=False,
                max_new_tokens=self.max_new_tokens, output_logits=True, return_dict_in_generate=True,
                pad_token_id=self.vlm.pad_token_id, eos_token_id=self.vlm.eos_token_ids, logits_processor=procs)
        finally:
            self.model.generation_config = saved
        steps = len(gen.logits)
        logits = list(gen.logits)
        if self.vcd is not None:
            logits = [contrastive_logits(z[:B], z[B:], self.vcd.alpha, self.vcd.beta) for z in logits]
        return gen.sequences[:B, -steps:].cpu(), logits

    def _answer_step(self, ids: List[int]) -> Optional[int]:
        dec = self.tokenizer.decode
        if self.answer_mode == "first_token":
            for t in range(len(ids)):
                if dec(ids[t : t + 1], skip_special_tokens=True).strip():
                    return t
            return None
        for t in range(len(ids)):
            if "<answer>" in dec(ids[: t + 1], skip_special_tokens=False):
                for u in range(t + 1, len(ids)):  # skip blank tokens after the tag
                    if dec(ids[u : u + 1], skip_special_tokens=True).strip():
                        return u
                return None
        return None

    @torch.no_grad()
    def answer_token_distribution(self, images, questions) -> AnswerBatch:
        new, step_logits = self._decode(*self._encode(images, questions))
        B = new.shape[0]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        sel, found = [], np.zeros(B, dtype=bool)
        for i in range(B):
            t = self._answer_step(new[i].tolist())
            found[i] = t is not None
            sel.append(t if t is not None else 0)
        # step_logits: one [B, V] tensor per step; pick each row's answer step (never stack all steps).
        ans_logits = torch.stack([step_logits[sel[i]][i].float().cpu() for i in range(B)])
        probs = ans_logits.double().softmax(-1)
        emitted = torch.tensor([int(new[i, sel[i]]) for i in range(B)], dtype=torch.long)
        conf = probs.gather(1, emitted[:, None])[:, 0]
        return _answer_batch(texts, self.parse_mode, self.entropy_fn, ans_logits, conf, found)


# ----------------------------------------------------------------------------------------------
# the diagnosis
# ----------------------------------------------------------------------------------------------
@dataclass
class Diagnosis:
    """Result of ``diagnose``. per_sigma[str(sigma)] is a plain dict (keys in ``diagnose``'s docstring)."""

    sigmas: List[float]
    per_sigma: Dict[str, dict]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return json_safe({"sigmas": self.sigmas, "per_sigma": self.per_sigma, "meta": self.meta})

    def save_json(self, path: str) -> str:
        """Write the report as strict JSON (NaN / inf as null) atomically; returns path."""
        return write_json(path, self.to_dict())

    def table(self) -> str:
        """Markdown summary, one row per sigma."""
        rows = ["| sigma | n | accuracy | mean H (nats) | H<=low frac | errors at H<=low | ECE | unparsed |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.sigmas:
            r = self.per_sigma[sigma_key(s)]
            rows.append(
                f"| {s:g} | {r['n']} | {r['accuracy']:.3f} | {r['mean_entropy']:.3f} | {r['low_entropy_frac']:.3f} | "
                f"{r['confident_error_frac']:.3f} | {r['ece']:.3f} | {r['unparsed']} |"
            )
        return "\n".join(rows)

    def save_plots(self, out_dir: str, prefix: str = "") -> List[str]:
        """reliability.png (per sigma), entropy_vs_sigma.png (mean H and accuracy vs sigma) and
        entropy_bins.png (accuracy per entropy bin per sigma); matplotlib Agg canvas, atomic writes."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        os.makedirs(out_dir, exist_ok=True)
        paths = []

        def _save(fig, name):
            FigureCanvasAgg(fig)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
            p = os.path.join(out_dir, prefix + name)
            atomic_write_bytes(p, buf.getvalue())
            paths.append(p)

        fig = Figure(figsize=(4.8, 4.4))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1, label="perfect calibration")
        for s in self.sigmas:
            bins = [b for b in self.per_sigma[sigma_key(s)]["reliability"] if b["count"]]
            ax.plot([b["mean_confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                    label=f"sigma={s:g} (ECE {self.per_sigma[sigma_key(s)]['ece']:.3f})")
        ax.set_xlabel("confidence (p of answer token)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title("Reliability diagram")
        ax.legend(fontsize=7)
        _save(fig, "reliability.png")

        fig = Figure(figsize=(5.2, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        xs = list(self.sigmas)
        ax.plot(xs, [self.per_sigma[sigma_key(s)]["mean_entropy"] for s in xs], marker="o", color="tab:red", label="mean H")
        ax.set_xlabel("noise sigma (0..255 scale)")
        ax.set_ylabel("answer-token entropy (nats)", color="tab:red")
        ax2 = ax.twinx()
        ax2.plot(xs, [self.per_sigma[sigma_key(s)]["accuracy"] for s in xs], marker="s", color="tab:blue", label="accuracy")
        ax2.plot(xs, [self.per_sigma[sigma_key(s)]["low_entropy_frac"] for s in xs], marker="^", ls=":", color="tab:gray",
                 label=f"frac H<={self.meta.get('low_entropy', 0.3):g}")
        ax2.set_ylabel("accuracy / fraction", color="tab:blue")
        ax2.set_ylim(0, 1.02)
        ax.set_title("Confidence trap: entropy vs. noise")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        _save(fig, "entropy_vs_sigma.png")

        fig = Figure(figsize=(5.2, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        labels = [b["label"] for b in self.per_sigma[sigma_key(self.sigmas[0])]["entropy_bins"]]
        width = 0.8 / max(len(self.sigmas), 1)
        for j, s in enumerate(self.sigmas):
            bins = self.per_sigma[sigma_key(s)]["entropy_bins"]
            acc = [b["accuracy"] if b["accuracy"] is not None else 0.0 for b in bins]
            ax.bar(np.arange(len(labels)) + j * width, acc, width, label=f"sigma={s:g}")
        ax.set_xticks(np.arange(len(labels)) + width * (len(self.sigmas) - 1) / 2)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title("Accuracy per answer-token entropy bin")
        ax.legend(fontsize=7)
        _save(fig, "entropy_bins.png")
        return paths


def _score(predictions: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    out = np.zeros(len(answers), dtype=bool)
    for i, (p, a) in enumerate(zip(predictions, answers)):
        g = normalize_yes_no(str(a))
        out[i] = p != UNPARSED and p == g
    return out


def diagnose(adapter: VLMAdapter, examples: Sequence[dict], sigmas: Sequence[float] = (0.0, 30.0, 50.0), *,
             seed: int = 0, batch_size: int = 32, n_bins: int = 10, entropy_edges: Sequence[float] = ENTROPY_EDGES,
             low_entropy: float = 0.3, keep_records: bool = False,
             progress: Optional[Callable[[float, int, int], None]] = None) -> Diagnosis:
    """Run the confidence-trap diagnosis.

    examples: dicts with image (uint8 array), question, answer; optional split, id (digits-POPE examples
    or ``hero.data.jsonl.load_jsonl`` output). Each sigma adds fresh seeded noise to the given images
    (``with_noise(examples, sigma, seed)``; sigma 0 = the images as given).
    progress(sigma, done, total) is called after each batch.

    per_sigma[str(sigma)] keys: n, accuracy, mean_entropy, median_entropy, mean_entropy_correct,
    mean_entropy_wrong (None if no such answers), mean_confidence, ece, reliability (bins),
    entropy_bins (accuracy per entropy bin), low_entropy_frac (share with H <= low_entropy),
    low_entropy_accuracy, confident_error_frac (share of errors made with H <= low_entropy), unparsed,
    answer_found_frac, pope (per split, only when every answer is yes/no; else None), chair (CHAIR_i/CHAIR_s of
    the digits named in ``<think>`` vs. ``digits``, only when every example has ``digits``), and with keep_records
    a list of per-example records (id, split, answer, prediction, text, entropy, confidence).
    """
    from .digits_pope import with_noise

    if not len(examples):
        raise ValueError("examples is empty")
    for i, ex in enumerate(examples):
        for k in ("image", "question", "answer"):
            if k not in ex:
                raise ValueError(f"examples[{i}] is missing '{k}'")
        if isinstance(ex["image"], (list, tuple)):  # JSONL allows image lists for training; POPE is one image
            raise ValueError(f"examples[{i}] (id {ex.get('id', i)!r}) has {len(ex['image'])} images; hero diagnose "
                             "scores one image per question: give 'image' a single path")
        if not isinstance(ex["image"], np.ndarray):
            raise ValueError(f"examples[{i}]['image'] must be a uint8 array (load_jsonl with load_images=True)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    answers = [str(ex["answer"]) for ex in examples]
    yes_no = all(a.strip().lower() in ("yes", "no") for a in answers)
    splits = [str(ex.get("split", "default")) for ex in examples]
    has_digits = all("digits" in ex for ex in examples)
    per_sigma = {}
    for sigma in sigmas:
        noisy = with_noise(examples, float(sigma), seed) if sigma else list(examples)
        texts, preds, H, conf, found = [], [], [], [], []
        for start in range(0, len(noisy), batch_size):
            chunk = noisy[start : start + batch_size]
            res = adapter.answer_token_distribution([e["image"] for e in chunk], [e["question"] for e in chunk])
            if len(res.predictions) != len(chunk):
                raise ValueError(f"adapter returned {len(res.predictions)} answers for a batch of {len(chunk)}")
            texts += res.texts
            preds += res.predictions
            H.append(np.asarray(res.entropy, dtype=np.float64))
            conf.append(np.asarray(res.confidence, dtype=np.float64))
            found.append(np.asarray(res.answer_found, dtype=bool))
            if progress is not None:
                progress(float(sigma), min(start + batch_size, len(noisy)), len(noisy))
        H, conf, found = np.concatenate(H), np.concatenate(conf), np.concatenate(found)
        if not np.all(np.isfinite(H)) or not np.all(np.isfinite(conf)):
            raise FloatingPointError(f"non-finite entropy/confidence at sigma={sigma}")
        correct = _score(preds, answers)
        low = H <= low_entropy
        wrong = ~correct
        r = {
            "sigma": float(sigma),
            "n": len(noisy),
            "accuracy": float(correct.mean()),
            "mean_entropy": float(H.mean()),
            "median_entropy": float(np.median(H)),
            "mean_entropy_correct": float(H[correct].mean()) if correct.any() else None,
            "mean_entropy_wrong": float(H[wrong].mean()) if wrong.any() else None,
            "mean_confidence": float(conf.mean()),
            "ece": expected_calibration_error(conf, correct, n_bins),
            "reliability": reliability_bins(conf, correct, n_bins),
            "entropy_bins": accuracy_by_entropy_bin(H, correct, entropy_edges),
            "low_entropy_frac": float(low.mean()),
            "low_entropy_accuracy": float(correct[low].mean()) if low.any() else None,
            "confident_error_frac": float((low & wrong).sum() / wrong.sum()) if wrong.any() else 0.0,
            "unparsed": int(sum(p == UNPARSED for p in preds)),
            "answer_found_frac": float(found.mean()),
            "pope": pope_metrics_by_split(preds, answers, splits) if yes_no else None,
            # digits-POPE only: CHAIR of the digits named in <think> vs. the digits really in the image
            "chair": chair([mentioned_digits(t) for t in texts], [ex["digits"] for ex in noisy]) if has_digits else None,
        }
        if keep_records:
            r["records"] = [
                {"id": str(ex.get("id", i)), "split": splits[i], "answer": answers[i], "prediction": preds[i],
                 "text": texts[i], "entropy": float(H[i]), "confidence": float(conf[i])}
                for i, ex in enumerate(noisy)
            ]
        per_sigma[sigma_key(sigma)] = r
    meta = {
        "adapter": getattr(adapter, "name", type(adapter).__name__),
        "n_examples": len(examples),
        "seed": seed,
        "n_bins": n_bins,
        "entropy_edges": [float(e) for e in entropy_edges],
        "low_entropy": low_entropy,
        "entropy_units": "nats",
    }
    return Diagnosis(sigmas=[float(s) for s in sigmas], per_sigma=per_sigma, meta=meta)
