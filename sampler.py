"""Samplers: plain functions over a model callable `model(x_t, t, cond) -> prediction`.

A hypernetwork wraps the model callable (see hyperalign.py); the samplers know nothing about LoRA.

Sections:
  # ---- VP diffusion (SD1.5)   noise schedule, DDIM with eta, classifier-free guidance, eps/v prediction, x0_hat
  # ---- rectified flow (FLUX)  shifted schedule, Euler, guidance-distilled sampling, 2x2 packing, image ids, x0_hat
"""
from __future__ import annotations

import torch


# ------------------------------------------------------------------------------------------------- VP diffusion (SD1.5)


# --------------------------------------------------------------------------------------------- rectified flow (FLUX)
import math  # noqa: E402
from typing import Callable  # noqa: E402

from einops import rearrange, repeat  # noqa: E402
from tqdm import tqdm  # noqa: E402

# Rectified flow: x_t = (1 - t) x0 + t eps, t from 1 (noise) to 0 (data); the model predicts the velocity v = eps - x0.
# FLUX works on 2x2-packed latents: (B, C, H, W) -> (B, L = H/2 W/2, 4C) tokens with (0, row, column) position ids.

def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """The schedule shift mu, linear in the number of image tokens through (256, 0.5) and (4096, 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """t' = e^mu / (e^mu + 1/t - 1): spends more steps at high noise for larger images (SD3 / FLUX); 0 stays 0."""
    return torch.where(t > 0, math.exp(mu) / (math.exp(mu) + 1 / t.clamp_min(1e-30) - 1), torch.zeros_like(t))


def flow_timesteps(num_steps: int, image_seq_len: int, shift: bool = True) -> torch.Tensor:
    """FLUX's schedule: t = linspace(1, 0, N + 1), shifted by mu(image_seq_len) for dev, unshifted for schnell."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        t = time_shift(flux_mu(image_seq_len), t)
    return t.float()  # (N + 1,)


def pack(z: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, H, W) -> tokens (B, H/2 W/2, 4C): each 2x2 patch becomes one token."""
    if z.shape[-2] % 2 or z.shape[-1] % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {tuple(z.shape[-2:])}")
    return rearrange(z, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)


def unpack(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Tokens (B, L, 4C) -> latents (B, C, H, W) for a latent of size (height, width)."""
    return rearrange(x, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Position ids (B, H/2 W/2, 3) = (0, row, column) of the packed tokens of a (height, width) latent."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return repeat(ids, "h w K -> B (h w) K", B=batch)


def flux_cond(txt: torch.Tensor, y: torch.Tensor, img_ids: torch.Tensor, guidance: float | None = None) -> dict:
    """The conditioning a FLUX model callable needs: T5 tokens, text ids (all 0), CLIP pooled y, image ids, and the
    distilled guidance scale as a (B,) tensor for guidance-distilled models (dev); None for schnell."""
    B, L = txt.shape[:2]
    cond = dict(txt=txt, txt_ids=torch.zeros(B, L, 3, device=txt.device), y=y, img_ids=img_ids)
    if guidance is not None:
        cond["guidance"] = torch.full((B,), float(guidance), device=txt.device)
    return cond


def flux_model_fn(flux: torch.nn.Module) -> Callable:
    """Adapt BFL's `flux(img, img_ids, txt, txt_ids, timesteps, y, guidance)` to the sampler contract
    `model(x_t, t, cond) -> v`. Inputs are cast to the model's dtype (bf16), v comes back in x_t's dtype (fp32)."""
    def model(x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        dtype = next(flux.parameters()).dtype
        g = cond.get("guidance")
        v = flux(x_t.to(dtype), cond["img_ids"], cond["txt"].to(dtype), cond["txt_ids"], t.to(dtype),
                 cond["y"].to(dtype), None if g is None else g.to(dtype))
        return v.to(x_t.dtype)
    return model


def flow_x0_hat(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """One-step prediction of the clean latent: x0_hat = x_t - t v (exact if v were the true velocity)."""
    return x_t - t * v


def flow_step(x_t: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of dx/dt = v from t to t_next (< t): returns (x_{t_next}, x0_hat)."""
    return x_t + (t_next - t) * v, flow_x0_hat(x_t, t, v)


def flow_sample(model: Callable, x_T: torch.Tensor, cond: dict, steps: int = 28, shift: bool = True,
                ts: torch.Tensor | None = None, trajectory: bool = False, progress: bool = False):
    """Rectified-flow sampling: Euler integration of dx/dt = v from t = 1 (noise x_T) to t = 0 (BFL `denoise`).

    `model(x_t, t, cond) -> v` on packed latents x_t (B, L, C) with t a float tensor (B,) in [0, 1] (see
    flux_model_fn). The times are `flow_timesteps(steps, L, shift)` (dev: shift=True; schnell: False) unless `ts` is
    given. Guidance-distilled (dev) and plain (schnell) sampling differ only in cond["guidance"] (see flux_cond).
    Returns x_0, or with trajectory=True (x_0, {"t": (N,), "x_t": (N+1, B, L, C) from x_T to x_0, "x0_hat": (N, ...)}).
    """
    ts = flow_timesteps(steps, x_T.shape[1], shift) if ts is None else ts
    x_t, xs, x0s = x_T, [x_T], []
    for t, t_next in tqdm(list(zip(ts[:-1].tolist(), ts[1:].tolist())), desc="Euler", disable=not progress):
        v = model(x_t, torch.full((x_t.shape[0],), t, dtype=x_t.dtype, device=x_t.device), cond)
        x_t, x0_hat = flow_step(x_t, v, t, t_next)
        if trajectory:
            xs.append(x_t)
            x0s.append(x0_hat)
    if trajectory:
        return x_t, {"t": ts[:-1], "x_t": torch.stack(xs), "x0_hat": torch.stack(x0s)}
    return x_t
