"""The frozen generator as the method sees it: one class per process, one contract, so that everything above works
with either (as k-diffusion has one model contract and one class per process).

    VP    SD1.x U-Net, VP diffusion: x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t integer in [0, 1000); cond = text
          context (B, S, E); the U-Net predicts eps (or v); sampled with DDIM + classifier-free guidance
    Flow  FLUX transformer, rectified flow: x_t = (1 - t) x0 + t eps, t in [0, 1]; cond = sampler.flux_cond dict;
          x are packed tokens; FLUX predicts the velocity v = eps - x0; sampled with Euler steps

The contract (Backbone):
    forward(weights, x_t, t, cond)     the samplers' `model(x_t, t, cond) -> prediction`, optionally with LoRA weights
                                       (lora.prepare); None and `backbone(x_t, t, cond)` run the base model
    features(x_t, t, cond)             the perception encoder E(x_t, t, c) of the hypernetwork (frozen)
    x0_hat / noised / recover / target the process's algebra (the formulas: sampler.py)
    conds / pairs / step / sample      what the pipeline asks of the process: conditioning, the sampler's times, one
                                       update, a whole trajectory; to_model / from_model: latents <-> model space

Shape alphabet: B batch, L feature tokens, F feature width, S text tokens, E embedding width, C H W latent shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import lora
import sampler

POOL = 8          # perception features are pooled to at most POOL x POOL tokens per level (SD1.5 at 512 px: 64x64)


def pool_tokens(x: Tensor, n: int = POOL * POOL) -> Tensor:
    """(B, L, F) tokens -> at most n tokens: a square grid is pooled in 2D, any other sequence in 1D (row order)."""
    L = x.shape[1]
    if L <= n:
        return x
    side = int(round(L ** 0.5))
    if side * side == L:
        grid = rearrange(x, "B (h w) F -> B F h w", h=side)
        return rearrange(F.adaptive_avg_pool2d(grid, POOL), "B F h w -> B (h w) F")
    return F.adaptive_avg_pool1d(x.transpose(1, 2), n).transpose(1, 2)


def gaussian_logprob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std² I), averaged over every dimension but the batch (as DDPO and Flow-GRPO take it): (B,)."""
    lp = -(x.detach() - mean) ** 2 / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.dim())))


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """A (B,) tensor of per-sample values, broadcastable to `like` (B, 1, ...)."""
    return t.to(like.dtype).view(-1, *[1] * (like.dim() - 1))


class Backbone:
    """What VP and Flow share: the frozen model, its dtype and device, and running it (with LoRA weights or not)."""
    kind: str                                 # "vp" or "flow": what a HyperConfig's `backbone` names
    t_dtype: torch.dtype                      # how the model takes its time
    model: nn.Module
    encoder_depth: int = 2                    # flow: double blocks in the perception encoder

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, weights: lora.Weights, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """f_{θ+Δθ}(x_t, t, cond) with LoRA weights from lora.prepare (None: the base model)."""
        return lora.run(self.model, weights, *self.inputs(x_t, t, cond)).to(x_t.dtype)

    def __call__(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The base model with the samplers' contract."""
        return self.forward(None, x_t, t, cond)


@dataclass
class VP(Backbone):
    model: nn.Module                          # unet.UNet, frozen
    schedule: sampler.VPSchedule              # alpha_bar and the prediction type (eps or v)
    kind = "vp"
    t_dtype = torch.int64

    def inputs(self, x_t: Tensor, t: Tensor, cond: Tensor) -> tuple:
        """The U-Net's positional inputs, cast to its dtype (a bf16 model takes bf16; x_t itself stays fp32)."""
        return x_t.to(self.dtype), t, cond.to(self.dtype)

    @torch.no_grad()
    def features(self, x_t: Tensor, t: Tensor, cond) -> tuple[list[Tensor], Tensor, Tensor]:
        """Perception encoder E(x_t, t, c), frozen: (levels, text, emb).

        levels  [(B, L_i, F_i)]: the output of every down level of the U-Net (the cross-attention levels and the last
                one), each average-pooled to at most POOL x POOL tokens
        text    (B, S, E): the prompt's own text tokens (the CLIP context)
        emb     (B, E'): the time embedding
        """
        args = self.inputs(x_t, t, cond)
        _, skips, emb = self.model.down(*args)
        L = self.model.config.layers_per_block
        # skips = [conv_in] + per level: its L outputs (+ the down-sampled one); level i's output is index i (L+1) + L
        outs = [skips[i * (L + 1) + L] for i in range(len(self.model.config.block_out_channels))]
        levels = [rearrange(F.adaptive_avg_pool2d(h, (min(POOL, h.shape[-2]), min(POOL, h.shape[-1]))),
                            "B C h w -> B (h w) C") for h in outs]
        return levels, args[2], emb

    def feature_dims(self) -> tuple[list[int], int, int]:
        """Widths of (levels, text, emb) as `features` returns them."""
        c = self.model.config
        return list(c.block_out_channels), c.cross_attention_dim, 4 * c.block_out_channels[0]

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar_t broadcastable to `like` (B, 1, ...); t < 0 means "before t = 0" (DDIM's final step)."""
        return _per_sample(self.schedule.alpha_bar_at(t.to(like.device)), like)

    def x0_hat(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """One-step prediction of the clean sample (DDIM eq. 9 / Tweedie)."""
        return sampler.predict_x0(x_t, pred, self._ab(t, x_t), self.schedule.prediction_type)[0]

    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The forward process q(x_t | x0) with the given noise."""
        return sampler.add_noise(x0, eps, self._ab(t, x0))

    def recover(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x0 from a state whose noise is known: the inverse of `noised` (Direct-Align's recovery, SRPO)."""
        ab = self._ab(t, x_t)
        return (x_t - (1 - ab) ** 0.5 * eps) / ab ** 0.5

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the model should predict at q(x_t | x0, eps): eps (or v)."""
        return sampler.training_target(x0, eps, self._ab(t, x0), self.schedule.prediction_type)

    def conds(self, text: Callable, prompts: list[str], negative: str, guidance: float, latent_hw) -> tuple:
        """(cond, uncond): the text context, and the negative prompt's for classifier-free guidance (None without)."""
        return text(prompts), text([negative] * len(prompts)) if guidance > 1 else None

    def to_model(self, z: Tensor) -> Tensor:
        return z                                                     # the U-Net works on latents (B, C, H, W)

    def from_model(self, x: Tensor, latent_hw) -> Tensor:
        return x

    def pairs(self, steps: int, latent_hw, shift: bool) -> list[tuple]:
        """[(t, t_next)]: the integer timesteps of the N DDIM updates."""
        return self.schedule.step_pairs(steps)

    def step(self, x_t: Tensor, pred: Tensor, t, t_next, eta: float = 0.0, generator=None) -> tuple[Tensor, Tensor]:
        """One DDIM update x_t -> x_{t_next} (the paper's Eq. 4): (x_next, x0_hat)."""
        return sampler.ddim_step(x_t, pred, t, t_next, self.schedule, eta, generator)

    def step_logprob(self, x_t: Tensor, pred: Tensor, t: Tensor, t_next: Tensor, eta: float = 1.0,
                     generator=None, x_next: Tensor | None = None, t_cap: float | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One stochastic DDIM step (Song et al. 2021 eq. 12 with sigma from eq. 16, η > 0) and the log-probability of
        its outcome, as DDPO takes it (ddim_step_with_logprob): (x_next, log p(x_next | x_t) (B,), mean, std). t and
        t_next are (B,) tensors; given `x_next`, its log-probability under this prediction (GRPO's ratio). `t_cap`
        is Flow's (the same interface); DDIM has no singular step."""
        ab, ab_prev = self._ab(t, x_t), self._ab(t_next, x_t)
        x0_hat, eps = sampler.predict_x0(x_t.float(), pred.float(), ab, self.schedule.prediction_type)
        std = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        mean = ab_prev.sqrt() * x0_hat + (1 - ab_prev - std ** 2).clamp_min(0).sqrt() * eps
        if x_next is None:
            x_next = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return x_next, gaussian_logprob(x_next, mean, std.expand_as(mean)), mean, std

    def sample(self, model: Callable, x_T: Tensor, cond, uncond, steps: int, guidance: float, shift: bool,
               eta: float = 0.0, generator=None, trajectory: bool = True, progress: bool = False):
        return sampler.ddim_sample(model, x_T, cond, self.schedule, steps, uncond=uncond, guidance=guidance, eta=eta,
                                   generator=generator, trajectory=trajectory, progress=progress)


@dataclass
class Flow(Backbone):
    model: nn.Module                          # flux.Flux, frozen
    encoder_depth: int = 2                    # double blocks in the perception encoder
    kind = "flow"
    t_dtype = torch.float32

    def inputs(self, x_t: Tensor, t: Tensor, cond: dict) -> tuple:
        """FLUX's positional inputs, cast to its dtype (a bf16 model takes bf16; x_t itself stays fp32)."""
        dtype, g = self.dtype, cond.get("guidance")
        return (x_t.to(dtype), cond["img_ids"], cond["txt"].to(dtype), cond["txt_ids"], t.to(dtype),
                cond["y"].to(dtype), None if g is None else g.to(dtype))

    @torch.no_grad()
    def features(self, x_t: Tensor, t: Tensor, cond) -> tuple[list[Tensor], Tensor, Tensor]:
        """Perception encoder E(x_t, t, c), frozen: (levels, text, emb): the image and text streams after the first
        `encoder_depth` double-stream blocks, each pooled to at most POOL² tokens; the T5 tokens; the modulation
        vector (time + pooled text + guidance).
        NOTE: the paper does not say what encodes x_t for FLUX; this is ours."""
        img, txt, vec, _ = self.model.forward_features(*self.inputs(x_t, t, cond), depth=self.encoder_depth)
        return [pool_tokens(img), pool_tokens(txt)], cond["txt"].to(self.dtype), vec

    def feature_dims(self) -> tuple[list[int], int, int]:
        c = self.model.config
        return [c.hidden_size, c.hidden_size], c.context_in_dim, c.hidden_size

    def x0_hat(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """One-step prediction of the clean sample: x_t - t v."""
        return sampler.flow_x0_hat(x_t, _per_sample(t, x_t), pred)

    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        t = _per_sample(t, x0)
        return (1 - t) * x0 + t * eps

    def recover(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        t = _per_sample(t, x_t)
        return (x_t - t * eps) / (1 - t)

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The velocity eps - x0."""
        return eps - x0

    def conds(self, text: Callable, prompts: list[str], negative: str, guidance: float, latent_hw) -> tuple:
        """(flux_cond, None): T5 tokens, pooled CLIP, image ids, and the distilled guidance for FLUX-dev; FLUX has no
        classifier-free guidance (a negative prompt does not apply)."""
        txt, y = text(prompts)
        g = guidance if self.model.config.guidance_embed else None
        return sampler.flux_cond(txt, y, sampler.image_ids(len(prompts), *latent_hw, txt.device), g), None

    def to_model(self, z: Tensor) -> Tensor:
        return sampler.pack(z)                                       # (B, C, H, W) -> tokens (B, L, 4C)

    def from_model(self, x: Tensor, latent_hw) -> Tensor:
        return sampler.unpack(x, *latent_hw)

    def pairs(self, steps: int, latent_hw, shift: bool) -> list[tuple]:
        """[(t, t_next)]: FLUX's times in [0, 1], shifted for the image-token count (dev) or not (schnell)."""
        h, w = latent_hw
        ts = sampler.flow_timesteps(steps, h * w // 4, shift).tolist()
        return list(zip(ts[:-1], ts[1:]))

    def step(self, x_t: Tensor, pred: Tensor, t, t_next, eta: float = 0.0, generator=None) -> tuple[Tensor, Tensor]:
        """One Euler step of the flow ODE: (x_next, x0_hat)."""
        return sampler.flow_step(x_t, pred, t, t_next)

    def step_logprob(self, x_t: Tensor, pred: Tensor, t: Tensor, t_next: Tensor, eta: float = 0.7,
                     generator=None, x_next: Tensor | None = None, t_cap: float | None = None
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One step of Flow-GRPO's SDE (sde_step_with_logprob, Liu et al. 2025), the reverse-time SDE whose marginals
        are the flow's, with noise level a = `eta`: std_t = a sqrt(t / (1 - t)), dt = t_next - t (< 0),
            mean = x (1 + std² dt / (2t)) + v (1 + std² (1 - t) / (2t)) dt,   x_next = mean + std sqrt(-dt) z;
        -> (x_next, log p(x_next | x_t) (B,), mean, std sqrt(-dt)). At t = 1 the (1 - t) in std uses `t_cap`, the
        schedule's second time, as Flow-GRPO does."""
        t, t_next = _per_sample(t, x_t).float(), _per_sample(t_next, x_t).float()
        denom = 1 - torch.where(t == 1, torch.full_like(t, t_cap if t_cap is not None else 1 - 1e-3), t)
        std, dt = eta * (t / denom).sqrt(), t_next - t
        x, v = x_t.float(), pred.float()
        mean = x * (1 + std ** 2 / (2 * t) * dt) + v * (1 + std ** 2 * (1 - t) / (2 * t)) * dt
        scale = std * (-dt).sqrt()
        if x_next is None:
            x_next = mean + scale * torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return x_next, gaussian_logprob(x_next, mean, scale.expand_as(mean)), mean, scale

    def sample(self, model: Callable, x_T: Tensor, cond, uncond, steps: int, guidance: float, shift: bool,
               eta: float = 0.0, generator=None, trajectory: bool = True, progress: bool = False):
        if eta:
            raise ValueError("FLUX samples with Euler steps: eta does not apply")
        return sampler.flow_sample(model, x_T, cond, steps, shift, trajectory=trajectory, progress=progress)


def make(kind: str, model: nn.Module, schedule: sampler.VPSchedule | None = None) -> Backbone:
    """VP(model, schedule) for "vp", Flow(model) for "flow" (a HyperConfig names its backbone by kind)."""
    if kind == "vp":
        if schedule is None:
            raise ValueError("a VP backbone needs its noise schedule")
        return VP(model, schedule)
    if kind == "flow":
        return Flow(model)
    raise ValueError(f"backbone kind must be 'vp' or 'flow', got {kind!r}")
