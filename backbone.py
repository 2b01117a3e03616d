"""The frozen generator as the method sees it: one adapter for the SD U-Net (VP diffusion) and the FLUX transformer
(rectified flow), so that everything above works with either.

    forward(weights, x_t, t, cond) the samplers' contract `model(x_t, t, cond) -> prediction`, optionally run with
                                   LoRA weights (lora.prepare); None runs the base model
    features(x_t, t, cond)         the perception encoder E(x_t, t, c) of the hypernetwork (frozen)
    x0_hat / noised / target       the process's algebra: one-step prediction, q(x_t | x0), the denoising target

    vp   (SD1.5): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t integer in [0, 1000); cond = text context (B, S, E);
                  the U-Net predicts eps (or v); the algebra is sampler.py's VP section.
    flow (FLUX):  x_t = (1 - t) x0 + t eps, t in [0, 1]; cond = sampler.flux_cond dict; x are packed tokens;
                  FLUX predicts the velocity v = eps - x0.

Shape alphabet: B batch, L feature tokens, F feature width, S text tokens, E embedding width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import lora
import sampler

KINDS = ("vp", "flow")
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


@dataclass
class Backbone:
    kind: str                                 # "vp" or "flow"
    model: nn.Module                          # unet.UNet or flux.Flux, frozen
    schedule: sampler.VPSchedule | None = None  # vp: alpha_bar and the prediction type (eps or v)
    encoder_depth: int = 2                    # flow: double blocks in the perception encoder

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"backbone kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "vp" and self.schedule is None:
            raise ValueError("a VP backbone needs its noise schedule")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def inputs(self, x_t: Tensor, t: Tensor, cond) -> tuple:
        """The model's positional inputs, cast to its dtype (a bf16 model takes bf16; x_t itself stays fp32)."""
        dtype = self.dtype
        if self.kind == "vp":
            return x_t.to(dtype), t, cond.to(dtype)
        g = cond.get("guidance")
        return (x_t.to(dtype), cond["img_ids"], cond["txt"].to(dtype), cond["txt_ids"], t.to(dtype),
                cond["y"].to(dtype), None if g is None else g.to(dtype))

    def forward(self, weights: lora.Weights, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """f_{θ+Δθ}(x_t, t, cond) with LoRA weights from lora.prepare (None: the base model)."""
        return lora.run(self.model, weights, *self.inputs(x_t, t, cond)).to(x_t.dtype)

    def __call__(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The base model with the samplers' contract."""
        return self.forward(None, x_t, t, cond)

    @torch.no_grad()
    def features(self, x_t: Tensor, t: Tensor, cond) -> tuple[list[Tensor], Tensor, Tensor]:
        """Perception encoder E(x_t, t, c), frozen: (levels, text, emb).

        levels  [(B, L_i, F_i)]: vp: the output of every down level of the U-Net (the cross-attention levels and the
                last one), each average-pooled to at most POOL x POOL tokens; flow: the image and text streams after
                the first `encoder_depth` double-stream blocks, each pooled to at most POOL² tokens
        text    (B, S, E): the prompt's own text tokens (CLIP context for SD, T5 states for FLUX)
        emb     (B, E'): the time embedding (FLUX: time + pooled text + guidance, the modulation vector)
        """
        if self.kind == "vp":
            args = self.inputs(x_t, t, cond)
            _, skips, emb = self.model.down(*args)
            L = self.model.config.layers_per_block
            # skips = [conv_in] + per level: its L outputs (+ the down-sampled one); level i's output is index i (L+1) + L
            outs = [skips[i * (L + 1) + L] for i in range(len(self.model.config.block_out_channels))]
            levels = [rearrange(F.adaptive_avg_pool2d(h, (min(POOL, h.shape[-2]), min(POOL, h.shape[-1]))),
                                "B C h w -> B (h w) C") for h in outs]
            return levels, args[2], emb
        # NOTE: the paper does not say what encodes x_t for FLUX; ours: the frozen embedders plus the first
        # `encoder_depth` double-stream blocks, image and text tokens, and the modulation vector.
        img, txt, vec, _ = self.model.forward_features(*self.inputs(x_t, t, cond), depth=self.encoder_depth)
        return [pool_tokens(img), pool_tokens(txt)], cond["txt"].to(self.dtype), vec

    def feature_dims(self) -> tuple[list[int], int, int]:
        """Widths of (levels, text, emb) as `features` returns them."""
        c = self.model.config
        if self.kind == "vp":
            return list(c.block_out_channels), c.cross_attention_dim, 4 * c.block_out_channels[0]
        return [c.hidden_size, c.hidden_size], c.context_in_dim, c.hidden_size

    # ---- the process's algebra (t is a (B,) tensor of model times)

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar_t broadcastable to `like`; t < 0 means "before t = 0" (DDIM's final step)."""
        t = t.long().to(like.device)
        ab = self.schedule.alpha_bar.to(like.device)[t.clamp_min(0)]
        ab = torch.where(t >= 0, ab, self.schedule.final_alpha_bar.to(like.device)).to(like.dtype)
        return ab.view(-1, *[1] * (like.dim() - 1))                # (B, 1, ...)

    def _t(self, t: Tensor, like: Tensor) -> Tensor:
        return t.to(like.dtype).view(-1, *[1] * (like.dim() - 1))

    def x0_hat(self, x_t: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """One-step prediction of the clean sample (DDIM eq. 9 / Tweedie for VP; x_t - t v for flow)."""
        if self.kind == "flow":
            return sampler.flow_x0_hat(x_t, self._t(t, x_t), pred)
        return sampler.predict_x0(x_t, pred, self._ab(t, x_t), self.schedule.prediction_type)[0]

    def noised(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The forward process q(x_t | x0) with the given noise."""
        if self.kind == "flow":
            return (1 - self._t(t, x0)) * x0 + self._t(t, x0) * eps
        return sampler.add_noise(x0, eps, self._ab(t, x0))

    def recover(self, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x0 from a state whose noise is known: the inverse of `noised` (Direct-Align's recovery, SRPO)."""
        if self.kind == "flow":
            return (x_t - self._t(t, x_t) * eps) / (1 - self._t(t, x_t))
        ab = self._ab(t, x_t)
        return (x_t - (1 - ab) ** 0.5 * eps) / ab ** 0.5

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the model should predict at q(x_t | x0, eps): eps (or v) for VP, the velocity eps - x0 for flow."""
        if self.kind == "flow":
            return eps - x0
        return sampler.training_target(x0, eps, self._ab(t, x0), self.schedule.prediction_type)
