"""Visual contrastive decoding (VCD, Leng et al. 2024), the decoding baseline of ``hero diagnose --decode vcd``.

At every step the model scores the next token twice, with the image v and with a distorted copy v' (the same
pixels under diffusion-style noise), and greedy decoding picks from

    z_vcd = (1 + alpha) z(v) - alpha z(v')                                           [B, V]

restricted to the tokens that are plausible under the clean image (adaptive plausibility cutoff beta):
tokens with p(y | v) < beta * max_w p(w | v) get -inf. The answer entropy, confidence and prediction are
then those of z_vcd, so the diagnosis reports whether VCD escapes the confidence trap exactly as it does
for greedy decoding. alpha = 0 and beta = 0 is greedy decoding bit for bit; alpha = 0 alone gives the
greedy tokens (the argmax is always plausible).

Distortion: the forward diffusion process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the linear
beta schedule of DDPM (beta_1 = 1e-4 ... beta_T = 0.02, T = 1000), applied to the model's pixel values at
step t = ``noise_steps`` (500 by default, VCD's setting). The Gaussian noise of each image is seeded by
(``seed``, a CRC of its pixels), so it does not depend on batching or order.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["VCDConfig", "alpha_bar", "diffusion_noise", "contrastive_logits", "vcd_decode", "tiny_vlm_branch",
           "hf_branch"]

#: DDPM's linear schedule: T steps of beta from BETA_START to BETA_END.
DIFFUSION_T, BETA_START, BETA_END = 1000, 1e-4, 0.02


@dataclass(frozen=True)
class VCDConfig:
    """alpha >= 0 (contrast strength), beta in [0, 1] (plausibility cutoff), noise_steps in [0, 1000]
    (diffusion step of the distorted image), seed (its noise)."""

    alpha: float = 1.0
    beta: float = 0.1
    noise_steps: int = 500
    seed: int = 0

    def __post_init__(self):
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"--vcd-alpha must be a finite number >= 0, got {self.alpha}")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"--vcd-beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.noise_steps <= DIFFUSION_T:
            raise ValueError(f"--vcd-noise-steps must be in [0, {DIFFUSION_T}], got {self.noise_steps}")


def alpha_bar(t: int) -> float:
    """prod_{s <= t} (1 - beta_s) of the linear schedule (t = 0: 1.0, the clean image)."""
    betas = torch.linspace(BETA_START, BETA_END, DIFFUSION_T, dtype=torch.float64)
    return float(torch.prod(1.0 - betas[:t]))


def diffusion_noise(pixel_values: Tensor, noise_steps: int, seed: int = 0) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps per image of pixel_values [B, ...] (same dtype / device);
    eps ~ N(0, I) from a generator seeded by (seed, crc32 of that image's values)."""
    ab = alpha_bar(noise_steps)
    x0 = pixel_values.detach().float().cpu()
    eps = torch.empty_like(x0)
    salt = zlib.crc32(str(int(seed)).encode())
    for i in range(x0.shape[0]):  # torch's CPU generator keeps 32 bits of a seed: fold the seed into the CRC
        g = torch.Generator().manual_seed(zlib.crc32(x0[i].contiguous().numpy().tobytes(), salt))
        eps[i] = torch.randn(x0[i].shape, generator=g)
    out = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * eps
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


def hf_branch(model, inputs: dict, pixel_key: str = "pixel_values", pixel_values: Optional[Tensor] = None) -> Branch:
    """A branch of any transformers VLM called as ``model(**inputs)``, without a KV cache (the whole sequence
    is re-run each step: model-specific position ids, e.g. Qwen2-VL's rope, stay the model's business).
    ``pixel_values`` replaces ``inputs[pixel_key]`` (the distorted image)."""
    state = dict(inputs)
    if pixel_values is not None:
        state[pixel_key] = pixel_values

    def run() -> Tensor:
        return model(**state, use_cache=False).logits[:, -1].float()

    def step(nxt: Tensor) -> Tensor:
        state["input_ids"] = torch.cat([state["input_ids"], nxt[:, None].to(state["input_ids"])], 1)
        m = state["attention_mask"]
        state["attention_mask"] = torch.cat([m, torch.ones_like(m[:, :1])], 1)
        return run()

    return run, step
