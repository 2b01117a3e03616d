"""Samplers: plain functions over a model callable `model(x_t, t, cond) -> prediction`.

A hypernetwork wraps the model callable (see hyperalign.py); the samplers know nothing about LoRA.

Sections:
  # ---- VP diffusion (SD1.5)   noise schedule, DDIM with eta, classifier-free guidance, eps/v prediction, x0_hat
  # ---- rectified flow (FLUX)  shifted schedule, Euler, guidance-distilled sampling, 2x2 packing, image ids, x0_hat
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from einops import rearrange, repeat
from tqdm import tqdm


# ------------------------------------------------------------------------------------------------- VP diffusion (SD1.5)
# DDPM forward process (Ho et al. 2020, eq. 4): q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I), integer
# t in [0, T). The model predicts eps (or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0, Salimans & Ho 2022).
# Settings use diffusers' scheduler_config.json vocabulary, so a pipeline's own config drives the sampler.

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                      clip_sample=False)
# NOTE: keys missing from a pipeline's config take DDIMScheduler's class defaults (not SD1.5's), as in diffusers.
DDIM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                     prediction_type="epsilon", timestep_spacing="leading", steps_offset=0, set_alpha_to_one=True,
                     clip_sample=True, clip_sample_range=1.0, trained_betas=None, thresholding=False,
                     rescale_betas_zero_snr=False)


@dataclass
class VPSchedule:
    alpha_bar: torch.Tensor          # (T,) float32, prod_{s<=t} (1 - beta_s)
    final_alpha_bar: torch.Tensor    # alpha_bar "before t = 0", used by the last DDIM step (1 or alpha_bar[0])
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample_range: float | None = None  # clamp x0_hat to [-r, r] when set

    @classmethod
    def from_config(cls, config: dict | None = None) -> "VPSchedule":
        """From a diffusers scheduler config dict (DDIM/PNDM/... share these keys); None -> SD1.5's settings."""
        c = {**DDIM_DEFAULTS, **{k: v for k, v in (SD15_SCHEDULER if config is None else config).items()}}
        if c["thresholding"] or c["rescale_betas_zero_snr"]:
            raise ValueError("unsupported scheduler config: thresholding / rescale_betas_zero_snr")
        T = c["num_train_timesteps"]
        if c["trained_betas"] is not None:
            beta = torch.tensor(c["trained_betas"], dtype=torch.float32)
        elif c["beta_schedule"] == "linear":
            beta = torch.linspace(c["beta_start"], c["beta_end"], T, dtype=torch.float32)
        elif c["beta_schedule"] == "scaled_linear":  # linear in sqrt(beta): the LDM / SD schedule
            beta = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"unsupported beta_schedule {c['beta_schedule']!r} (linear, scaled_linear)")
        if c["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {c['prediction_type']!r}")
        if c["timestep_spacing"] not in ("leading", "trailing", "linspace"):
            raise ValueError(f"unsupported timestep_spacing {c['timestep_spacing']!r}")
        alpha_bar = torch.cumprod(1.0 - beta, dim=0)
        final = torch.tensor(1.0) if c["set_alpha_to_one"] else alpha_bar[0]
        return cls(alpha_bar, final, c["prediction_type"], c["timestep_spacing"], c["steps_offset"],
                   c["clip_sample_range"] if c["clip_sample"] else None)

    @property
    def T(self) -> int:
        return len(self.alpha_bar)

    def timesteps(self, steps: int) -> torch.Tensor:
        """The `steps` training timesteps a sampler visits, high to low (DDIM's sub-sequence tau, Song et al. sec 4.2)."""
        T = self.T
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if self.timestep_spacing == "leading":
            ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / steps)) - 1
        else:  # linspace
            ts = np.linspace(0, T - 1, steps).round()[::-1]
        return torch.from_numpy(ts.astype(np.int64).copy())

    def step_pairs(self, steps: int) -> list[tuple[int, int]]:
        """[(t, t_prev)] of the `steps` DDIM updates, t_prev < 0 meaning "before t = 0" (final_alpha_bar).

        NOTE: diffusers' DDIM steps back by T // N whatever the spacing, so with "trailing" or "linspace" spacing
        t_prev is not always the next visited timestep; we do the same, for parity.
        """
        return [(t, t - self.T // steps) for t in self.timesteps(steps).tolist()]

    def alpha_bar_at(self, t: int | torch.Tensor) -> torch.Tensor:
        """alpha_bar_t of one timestep or a tensor of them; t < 0 means "before t = 0" (DDIM's last step lands
        there: final_alpha_bar)."""
        t = torch.as_tensor(t)
        ab = self.alpha_bar.to(t.device)[t.long().clamp_min(0)]
        return torch.where(t >= 0, ab, self.final_alpha_bar.to(t.device))


def predict_x0(x_t: torch.Tensor, pred: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str = "epsilon"):
    """The one-step prediction x0_hat(x_t) and the implied eps (DDIM eq. 9 / Tweedie): returns (x0_hat, eps)."""
    a, b = alpha_bar_t ** 0.5, (1 - alpha_bar_t) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - b * pred) / a, pred
    if prediction_type == "v_prediction":
        return a * x_t - b * pred, a * pred + b * x_t
    if prediction_type == "sample":
        return pred, (x_t - a * pred) / b
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0) (DDPM eq. 4; the VP discretisation of the paper's Eq. 1); alpha_bar_t broadcastable, e.g.
    (B, 1, 1, 1)."""
    return alpha_bar_t ** 0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * eps


def training_target(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor, prediction_type: str = "epsilon"):
    """What the model should output at x_t = add_noise(x0, eps): eps, v, or x0 (denoising score matching, the paper's
    Eq. 3)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return alpha_bar_t ** 0.5 * eps - (1 - alpha_bar_t) ** 0.5 * x0
    return x0


def guided(model: Callable, x_t: torch.Tensor, t: torch.Tensor, cond, uncond=None, guidance: float = 1.0):
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): uncond + g (cond - uncond), in one model call per step
    (the batch: guidance_rows); without guidance (g <= 1 or no uncond) the model on x_t, t (B,), cond."""
    if guidance > 1.0 and uncond is not None:
        pred_uncond, pred_cond = guidance_split(model(*guidance_rows(x_t, t, cond, uncond)))
        return pred_uncond + guidance * (pred_cond - pred_uncond)
    return model(x_t, t, cond)


def guidance_rows(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> tuple:
    """The model batch under classifier-free guidance: each sample twice, its two copies adjacent and the
    unconditional one first, rows (B 2): x_t (2B, ...), t (2B,), context [uncond_0, cond_0, uncond_1, cond_1, ...].
    NOTE: diffusers stacks the copies as [uncond; cond] (2 B). With each sample's copies adjacent, a per-sample LoRA
    (HyperAlign at batch > 1) runs a sample's rows as one matrix, with no copy of its weights per copy (lora.py)."""
    return x_t.repeat_interleave(2, 0), t.repeat_interleave(2, 0), torch.stack([uncond, cond], 1).flatten(0, 1)


def guidance_split(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output on guidance_rows (2B, ...) -> (unconditional, conditional) predictions, each (B, ...)."""
    return pred.unflatten(0, (-1, 2)).unbind(1)


def ddim_step(x_t: torch.Tensor, pred: torch.Tensor, t: int, t_prev: int, schedule: VPSchedule, eta: float = 0.0,
              generator: torch.Generator | None = None):
    """One DDIM update x_t -> x_{t_prev} (the paper's Eq. 4; Song et al. 2021, eq. 12 with sigma from eq. 16):
    returns (x_prev, x0_hat)."""
    alpha_bar_t, alpha_bar_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
    x0_hat, eps = predict_x0(x_t, pred, alpha_bar_t, schedule.prediction_type)
    if schedule.clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5
    x_prev = alpha_bar_prev ** 0.5 * x0_hat + (1 - alpha_bar_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0:
        device = generator.device if generator is not None else x_t.device
        noise = torch.randn(x_t.shape, generator=generator, device=device, dtype=x_t.dtype).to(x_t.device)
        x_prev = x_prev + sigma * noise
    return x_prev, x0_hat


def ddim_sample(model: Callable, x_T: torch.Tensor, cond, schedule: VPSchedule, steps: int = 50, uncond=None,
                guidance: float = 1.0, eta: float = 0.0, generator: torch.Generator | None = None,
                trajectory: bool = False, progress: bool = False):
    """DDIM sampling (Song et al. 2021; the discretised reverse process of the paper's Eq. 2) from x_T ~ N(0, I) over
    `schedule.timesteps(steps)`.

    `model(x_t, t, cond) -> pred` is called once per step (see `guided` for the batching under guidance); t is an
    int64 tensor of shape (batch,) holding the current training timestep. Returns x_0, or with trajectory=True
    (x_0, {"t": (N,), "x_t": (N+1, B, ...) from x_T to x_0, "x0_hat": (N, B, ...)}).
    """
    pairs = schedule.step_pairs(steps)
    x_t, xs, x0s = x_T, [x_T], []
    for t, t_prev in tqdm(pairs, desc="DDIM", disable=not progress):
        t_batch = torch.full((x_t.shape[0],), t, dtype=torch.int64, device=x_t.device)
        pred = guided(model, x_t, t_batch, cond, uncond, guidance)
        x_t, x0_hat = ddim_step(x_t, pred, t, t_prev, schedule, eta, generator)
        if trajectory:
            xs.append(x_t)
            x0s.append(x0_hat)
    if trajectory:
        return x_t, {"t": torch.tensor([t for t, _ in pairs]), "x_t": torch.stack(xs), "x0_hat": torch.stack(x0s)}
    return x_t


# --------------------------------------------------------------------------------------------- rectified flow (FLUX)

# Rectified flow (Liu et al. 2022; SD3's x_t = a_t x0 + b_t eps with a_t = 1 - t, b_t = t): x_t = (1 - t) x0 + t eps,
# t from 1 (noise) to 0 (data); the model predicts the velocity v = dx_t/dt = eps - x0.
# FLUX works on 2x2-packed latents: (B, C, H, W) -> (B, L = H/2 W/2, 4C) tokens with (0, row, column) position ids.

def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """The schedule shift mu, linear in the number of image tokens through (256, 0.5) and (4096, 1.15)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """t' = e^mu / (e^mu + 1/t - 1): more steps at high noise for larger images; 0 stays 0. The resolution-dependent
    shift of SD3 (Esser et al. 2024, "resolution-dependent shifting") with alpha = e^mu, as FLUX uses it."""
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


def flow_x0_hat(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """One-step prediction of the clean latent: x0_hat = x_t - t v (exact if v were the true velocity)."""
    return x_t - t * v


def flow_step(x_t: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of dx/dt = v from t to t_next (< t): returns (x_{t_next}, x0_hat)."""
    return x_t + (t_next - t) * v, flow_x0_hat(x_t, t, v)


def flow_sample(model: Callable, x_T: torch.Tensor, cond: dict, steps: int = 28, shift: bool = True,
                ts: torch.Tensor | None = None, trajectory: bool = False, progress: bool = False):
    """Rectified-flow sampling: Euler integration of dx/dt = v from t = 1 (noise x_T) to t = 0 (BFL `denoise`; the
    paper's Eq. 2 for flow models).

    `model(x_t, t, cond) -> v` on packed latents x_t (B, L, C) with t a float tensor (B,) in [0, 1] (see
    backbone.Backbone). The times are `flow_timesteps(steps, L, shift)` (dev: shift=True; schnell: False) unless `ts` is
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
