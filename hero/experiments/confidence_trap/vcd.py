"""Visual contrastive decoding (VCD, Leng et al. 2024), the decoding baseline of ``hero diagnose --decode vcd``.

At every step the model scores the next token twice, with the image v and with a distorted copy v' (the same
pixels under diffusion-style noise), and greedy decoding picks from

    z_vcd = (1 + alpha) z(v) - alpha z(v')                                           [B, V]

restricted to the tokens that are plausible under the clean image (adaptive plausibility cutoff beta):
tokens with p(y | v) < beta * max_w p(w | v) get -inf. The answer entropy, confidence and prediction are
then those of z_vcd, so the diagnosis reports whether VCD escapes the confidence trap exactly as it does
for greedy decoding. alpha = 0 and beta = 0 is greedy decoding; alpha = 0 alone gives the greedy tokens
(the argmax is always plausible).

Distortion: the forward diffusion process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) at step
t = ``noise_steps`` (500 by default, VCD's setting) of a 1000-step beta schedule, applied to the model's
*processed* pixel values: resized and normalized by the image processor, no clipping. That is where VCD's
reference code adds it (``add_diffusion_noise`` on the tensor LLaVA's image processor returns); noising the
uint8 image before the processor would clip and quantize the noise instead. Schedules (``schedule``):

* ``vcd`` (default, so the baseline is VCD as published): the reference code's sigmoid betas,
  sigmoid(linspace(-6, 6)) * (5e-3 - 1e-5) + 1e-5; abar_500 = 0.747 (signal x0.86, noise x0.50);
* ``ddpm``: DDPM's linear betas 1e-4 ... 0.02; abar_500 = 0.079 (signal x0.28, noise x0.96), a much
  stronger distortion at the same step.

Both apply t betas at step t (0 = the clean image; the reference code indexes t + 1 of them). The Gaussian
noise of each image is seeded by (``seed``, a CRC of that image), so it does not depend on batching or order.

Two drivers: ``vcd_decode`` runs two KV-cached branches in lockstep (the tiny VLM); transformers models run
one ``generate`` over the batch doubled [clean rows; distorted rows] with ``VCDLogitsProcessor``, which
gives both halves the same contrastive scores, so each row and its distorted twin pick the same token, keep
their own KV cache rows and model-specific positions (Qwen2-VL's M-RoPE), and stop at eos together.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["VCDConfig", "SCHEDULES", "alpha_bar", "diffusion_noise", "distort_rows", "contrastive_logits",
           "vcd_decode", "tiny_vlm_branch", "VCDLogitsProcessor"]

#: T steps; DDPM's linear schedule runs beta from BETA_START to BETA_END.
DIFFUSION_T, BETA_START, BETA_END = 1000, 1e-4, 0.02
#: noise schedules (module docstring)
SCHEDULES = ("ddpm", "vcd")


@dataclass(frozen=True)
class VCDConfig:
    """alpha >= 0 (contrast strength), beta in [0, 1] (plausibility cutoff), noise_steps in [0, 1000]
    (diffusion step of the distorted image), seed (its noise), schedule (``SCHEDULES``)."""

    alpha: float = 1.0
    beta: float = 0.1
    noise_steps: int = 500
    seed: int = 0
    schedule: str = "vcd"

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"--vcd-alpha must be a finite number >= 0, got {self.alpha}")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"--vcd-beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.noise_steps <= DIFFUSION_T:
            raise ValueError(f"--vcd-noise-steps must be in [0, {DIFFUSION_T}], got {self.noise_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--vcd-schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def alpha_bar(t: int, schedule: str = "vcd") -> float:
    """prod_{s <= t} (1 - beta_s) of ``schedule`` (t = 0: 1.0, the clean image)."""
    if schedule == "ddpm":
        betas = torch.linspace(BETA_START, BETA_END, DIFFUSION_T, dtype=torch.float64)
    elif schedule == "vcd":
        betas = torch.linspace(-6, 6, DIFFUSION_T, dtype=torch.float64).sigmoid() * (5e-3 - 1e-5) + 1e-5
    else:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return float(torch.prod(1.0 - betas[:t]))


def _generator(seed: int, data: bytes) -> torch.Generator:
    """A CPU generator seeded by (seed, crc32(data)); torch keeps 32 bits of a seed, so the seed is the CRC's salt."""
    return torch.Generator().manual_seed(zlib.crc32(data, zlib.crc32(str(int(seed)).encode())))


def diffusion_noise(pixel_values: Tensor, noise_steps: int, seed: int = 0, schedule: str = "vcd") -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps per image of pixel_values [B, ...] (same dtype / device);
    eps ~ N(0, I) from a generator seeded by (seed, crc32 of that image's values)."""
    ab = alpha_bar(noise_steps, schedule)
    x0 = pixel_values.detach().float().cpu()
    eps = torch.empty_like(x0)
    for i in range(x0.shape[0]):
        eps[i] = torch.randn(x0[i].shape, generator=_generator(seed, x0[i].contiguous().numpy().tobytes()))
    out = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * eps
    return out.to(device=pixel_values.device, dtype=pixel_values.dtype)


def _image_eps(x: Tensor, g: torch.Generator, frames: Optional[Tuple[int, int]]) -> Tensor:
    """Standard normal noise shaped like one image's processed pixels ``x`` (float32, CPU).

    frames (T, P*P): ``x`` is [n patches, C * T * P*P] (Qwen-VL layout: channel, frame, pixel), and an image's
    T frames are copies of it; they get the same noise, as if the image was noised before the copy (checked:
    frames that differ get their own noise). Else x is [3, H, W] (one noise tensor) or [tiles, 3, H, W]
    (one per tile, in order, so a tile's noise does not depend on how many padding tiles follow). An all-zero
    tile is padding and gets no noise: Idefics3 tells its padding images from real ones by exactly that, so a
    noised padding tile would become an extra image with no placeholder tokens."""
    if frames is not None and x.dim() == 2:
        T, pp = frames
        v = x.view(x.shape[0], -1, T, pp)
        if T > 1 and torch.equal(v, v[:, :, :1].expand_as(v)):
            return torch.randn(v[:, :, :1].shape, generator=g).expand_as(v).reshape(x.shape)
    if x.dim() >= 4:
        eps = torch.stack([torch.randn(t.shape, generator=g) for t in x])
        return eps.masked_fill_((x == 0).flatten(1).all(1).view(-1, *[1] * (x.dim() - 1)), 0.0)
    return torch.randn(x.shape, generator=g)


def distort_rows(pixel_values: Tensor, cfg: "VCDConfig", keys: Sequence[bytes], counts: Optional[Sequence[int]] = None,
                 frames: Optional[Tuple[int, int]] = None) -> Tensor:
    """The distorted image v' of every row of processed pixel values, one image per row: [B, ...] -> same shape,
    dtype and device. Row i's noise is seeded by (cfg.seed, keys[i]) (the raw image's bytes, so it does not
    depend on batching or padding). counts[i]: row i's valid leading entries (Qwen-VL patches packed per row;
    the padding after them is left as is); frames: see ``_image_eps``."""
    ab = alpha_bar(cfg.noise_steps, cfg.schedule)
    out = pixel_values.detach().float().cpu().clone()
    for i, key in enumerate(keys):
        x = out[i] if counts is None else out[i, : int(counts[i])]
        eps = _image_eps(x, _generator(cfg.seed, key), frames)
        x.mul_(math.sqrt(ab)).add_(eps, alpha=math.sqrt(1.0 - ab))  # in place: x views out's row
    return out.to(device=pixel_values.device, dtype=pixel_values.dtype)


def contrastive_logits(z: Tensor, z_distorted: Tensor, alpha: float, beta: float) -> Tensor:
    """(1 + alpha) z - alpha z' with the plausibility cutoff of z at beta: [B, V] float32, -inf where cut."""
    z, zd = z.float(), z_distorted.float()
    out = z if alpha == 0 else (1.0 + alpha) * z - alpha * zd
    if beta > 0:
        logp = z.log_softmax(-1)
        cut = logp < logp.max(-1, keepdim=True).values + math.log(beta)
        out = out.masked_fill(cut, float("-inf"))
    return out


#: A decoding branch: ``start() -> logits [B, V]`` of the first new token, then ``step(tokens [B]) -> logits``.
Branch = Tuple[Callable[[], Tensor], Callable[[Tensor], Tensor]]


def vcd_decode(clean: Branch, distorted: Branch, cfg: VCDConfig, max_new_tokens: int, eos_ids: Sequence[int],
               pad_id: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Greedy VCD decoding -> (tokens [B, T], completion_mask [B, T] (1 up to and including eos), logits
    [B, T, V] of z_vcd at each step); a row stops at its first eos (then pad), all stop when every row did."""
    z, zd = clean[0](), distorted[0]()
    eos = torch.as_tensor(list(eos_ids), device=z.device)
    finished = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    tokens: List[Tensor] = []
    logits: List[Tensor] = []
    for step in range(max_new_tokens):
        final = contrastive_logits(z, zd, cfg.alpha, cfg.beta)
        nxt = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long), final.argmax(-1))
        tokens.append(nxt)
        logits.append(final)
        finished = finished | torch.isin(nxt, eos)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        z, zd = clean[1](nxt), distorted[1](nxt)
    seq = torch.stack(tokens, 1)
    is_eos = torch.isin(seq, eos).long()
    mask = ((is_eos.cumsum(1) - is_eos) == 0).long()
    return seq, mask, torch.stack(logits, 1)


def tiny_vlm_branch(model, input_ids: Tensor, attention_mask: Tensor, pixel_values: Tensor) -> Branch:
    """A KV-cached branch of ``TinyVLM`` (the computation of ``TinyVLM.generate``'s greedy path)."""
    state = {"mask": attention_mask.long()}
    head = model.get_output_embeddings()

    def start() -> Tensor:
        pos = model.position_ids(state["mask"])
        state["cache"] = model._new_cache()
        state["pos"] = pos[:, -1] + 1
        h = model._run(model.embed(input_ids, pixel_values), state["mask"], pos, cache=state["cache"])
        return head(h.last_hidden_state[:, -1]).float()

    def step(nxt: Tensor) -> Tensor:
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], 1)
        e = model.get_input_embeddings()(nxt[:, None])
        h = model._run(e, state["mask"], state["pos"][:, None], cache=state["cache"]).last_hidden_state[:, -1]
        state["pos"] = state["pos"] + 1
        return head(h).float()

    return start, step


class VCDLogitsProcessor:
    """A transformers logits processor for ``generate`` on the doubled batch [clean rows; distorted rows]
    ([2B, V] scores in, [2B, V] out): both halves get ``contrastive_logits(clean, distorted)``, so greedy
    search picks the same token for a row and its distorted twin. ``hero diagnose`` runs generate with a bare
    generation config, so no other processor (e.g. a checkpoint's repetition penalty) touches the scores and
    the token is the argmax of the contrast it reports."""

    def __init__(self, alpha: float, beta: float):
        self.alpha, self.beta = float(alpha), float(beta)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] % 2:
            raise ValueError(f"VCD needs the doubled batch [clean; distorted], got {scores.shape[0]} rows")
        B = scores.shape[0] // 2
        final = contrastive_logits(scores[:B], scores[B:], self.alpha, self.beta).to(scores.dtype)
        return torch.cat([final, final])
