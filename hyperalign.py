"""HyperAlign (Xie, Guo, Gong, arXiv 2601.15968): a hypernetwork that writes LoRA weights for a frozen text-to-image
model from the current state (x_t, t, c), trained with a reward loss regularised by preference data.

    features = E(x_t, t, c)                      frozen perception encoder (U-Net down blocks / FLUX embedders + blocks)
    Δθ_t     = H(features)                       Linear -> transformer decoder (zero-init queries) -> Linear   (Eq. 7)
    pred     = f_{θ + Δθ_t}(x_t, t, c)           the frozen generator run with θ + Δθ_t (lora.py)
    L        = L_R + λ L_G                       reward of the one-step prediction + denoising loss on preferred data

Sections:
  # ---- config        HyperConfig and named presets; the LoRA factorisation
  # ---- backbone      what HyperAlign needs from the frozen model: VP (SD U-Net) or flow (FLUX), one adapter each
  # ---- hypernetwork  the decoder with one query token per target layer, and the LoRA head (Δθ = 0 at init)
  # ---- variants      S / I / P as a model callable for the samplers in sampler.py; P's key steps
  # ---- losses        L_R and L_G

Shape alphabet: B samples, K copies of a sample in the model batch (CFG: 2), L feature tokens, F feature width,
E embedding width, T target layers (= query tokens), D decoder width, R LoRA rank, I / O in / out features.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file
from torch import Tensor, nn

import lora
import sampler
from weights import check_state_dict

VARIANTS = ("S", "I", "P")


# ------------------------------------------------------------------------------------------------------------ config

@dataclass
class HyperConfig:
    backbone: str = "vp"                      # "vp": SD U-Net (eps or v); "flow": FLUX (velocity)
    targets: tuple[str, ...] = lora.UNET_TARGETS  # regexes over the frozen model's nn.Linear names (lora.py)
    rank: int = 8                             # R. NOTE: rank, widths and depths are not published; ours.
    alpha: float = 8.0                        # LoRA scale s = alpha / R
    d_model: int = 512                        # D
    n_layer: int = 2
    n_head: int = 8
    encoder_depth: int = 2                    # flow: double blocks in the perception encoder
    variant: str = "I"                        # "S" every step, "I" once from x_T, "P" at key steps
    key_times: tuple[float, ...] = ()         # P: model times (t values) where a segment starts, set by calibration

    def __post_init__(self):
        self.targets, self.key_times = tuple(self.targets), tuple(self.key_times)
        if self.backbone not in ("vp", "flow"):
            raise ValueError(f"backbone must be 'vp' or 'flow', got {self.backbone!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.rank < 1 or self.d_model % self.n_head:
            raise ValueError(f"need rank >= 1 and d_model divisible by n_head (got {self.rank}, {self.d_model}, "
                             f"{self.n_head})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def preset(cls, name: str, **overrides) -> "HyperConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown HyperAlign preset {name!r}; choose from {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, HyperConfig] = {
    "sd15": HyperConfig(),
    "flux-dev": HyperConfig(backbone="flow", targets=lora.FLUX_TARGETS, encoder_depth=2),
    "toy-sd": HyperConfig(rank=4, alpha=4.0, d_model=64, n_layer=1, n_head=4),
    "toy-flux": HyperConfig(backbone="flow", targets=lora.FLUX_TARGETS, rank=4, alpha=4.0, d_model=64, n_layer=1,
                            n_head=4, encoder_depth=1),
}


# ---------------------------------------------------------------------------------------------------------- backbone

@dataclass
class Backbone:
    """The frozen generator as HyperAlign sees it: modulated forward, perception encoder, and the process's algebra.

    vp   (SD1.5): x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, t integer in [0, 1000); cond = text context (B, S, E);
                  the U-Net predicts eps (or v); the algebra is sampler.py's VP section.
    flow (FLUX):  x_t = (1 - t) x0 + t eps, t in [0, 1]; cond = sampler.flux_cond dict; x are packed tokens;
                  FLUX predicts the velocity v = eps - x0.
    """
    kind: str
    model: nn.Module
    schedule: sampler.VPSchedule | None = None  # vp: alpha_bar and the prediction type (eps or v)
    encoder_depth: int = 2                    # flow

    def forward(self, params: dict[str, Tensor] | None, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """The modulated model f_{θ+Δθ}(x_t, t, cond) with the samplers' contract, run with the merged weights
        `params` from lora.merged_params (None: the base model)."""
        dtype = next(self.model.parameters()).dtype               # bf16 models take bf16 inputs; x_t stays fp32
        if self.kind == "vp":
            args = (x_t.to(dtype), t, cond.to(dtype))
        else:
            g = cond.get("guidance")
            args = (x_t.to(dtype), cond["img_ids"], cond["txt"].to(dtype), cond["txt_ids"], t.to(dtype),
                    cond["y"].to(dtype), None if g is None else g.to(dtype))
        out = self.model(*args) if params is None else lora.call_merged(self.model, params, *args)
        return out.to(x_t.dtype)

    @torch.no_grad()
    def features(self, x_t: Tensor, t: Tensor, cond) -> tuple[Tensor, Tensor]:
        """Perception encoder E(x_t, t, c) -> tokens (B, L, F), embedding (B, E). Frozen: never any gradient."""
        dtype = next(self.model.parameters()).dtype
        if self.kind == "vp":
            h, _, emb = self.model.down(x_t.to(dtype), t, cond.to(dtype))  # h (B, C, h, w), emb (B, 4 C0)
            return rearrange(h, "B C h w -> B (h w) C"), emb
        # NOTE: the paper does not say what encodes x_t for FLUX; ours: the frozen embedders plus the first
        # `encoder_depth` double-stream blocks, image and text tokens together, and the vector embedding.
        g = cond.get("guidance")
        img, txt, vec, _ = self.model.forward_features(
            x_t.to(dtype), cond["img_ids"], cond["txt"].to(dtype), cond["txt_ids"], t.to(dtype), cond["y"].to(dtype),
            None if g is None else g.to(dtype), depth=self.encoder_depth)
        return torch.cat([txt, img], dim=1), vec                  # (B, L_txt + L_img, W), (B, W)

    def feature_dims(self) -> tuple[int, int]:
        if self.kind == "vp":
            c = self.model.config
            return c.block_out_channels[-1], 4 * c.block_out_channels[0]
        return self.model.config.hidden_size, self.model.config.hidden_size

    def _ab(self, t: Tensor, like: Tensor) -> Tensor:
        ab = self.schedule.alpha_bar.to(like.device)[t.long()].to(like.dtype)
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

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the model should predict at q(x_t | x0, eps): eps (or v) for VP, the velocity eps - x0 for flow."""
        if self.kind == "flow":
            return eps - x0
        return sampler.training_target(x0, eps, self._ab(t, x0), self.schedule.prediction_type)


# ------------------------------------------------------------------------------------------------------ hypernetwork

class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        q, k, v = (rearrange(p, "B L (N D) -> B N L D", N=self.n_head) for p in (self.q(x), self.k(kv), self.v(kv)))
        return self.o(rearrange(F.scaled_dot_product_attention(q, k, v), "B N L D -> B L (N D)"))


class DecoderLayer(nn.Module):
    """Pre-norm transformer decoder layer: self-attention among the queries, cross-attention to the features, MLP."""
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.ln_1, self.ln_2, self.ln_kv, self.ln_3 = (nn.LayerNorm(d) for _ in range(4))
        self.self_attn, self.cross_attn = Attention(d, n_head), Attention(d, n_head)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        h = self.ln_1(q)
        q = q + self.self_attn(h, h)
        q = q + self.cross_attn(self.ln_2(q), self.ln_kv(kv))
        return q + self.mlp(self.ln_3(q))


class HyperNet(nn.Module):
    """The trainable part of HyperAlign (Fig. 3): Linear -> transformer decoder -> Linear -> LoRA factors (Eq. 7).

    One query token per target layer; the queries are zero-initialised (as in the paper) plus learned positions, so
    the tokens can tell the layers apart. The head maps token T to a small (R, R) matrix M_T and the LoRA of target T is

        A_T = (I + M_T) A_aux_T  (R, I),   B_T = B_aux_T  (O, R),   Δθ_T = s B_T A_T

    NOTE: the paper's head "maps decoded features to LoRA weights"; emitting full (O + I) x R factors per layer would
    need a head of ~10^8 parameters for SD1.5. Like a third-party replication we factor through per-target matrices
    (A_aux random, B_aux zero-initialised, both trained), so Δθ = 0 exactly at initialisation while the head still
    makes every layer's update depend on (x_t, t, c).
    """
    def __init__(self, cfg: HyperConfig, targets: list[lora.Target], feat_dim: int, emb_dim: int):
        super().__init__()
        self.cfg, self.targets = cfg, list(targets)
        D, R, T = cfg.d_model, cfg.rank, len(targets)
        self.proj = nn.Linear(feat_dim, D)                        # encoded features -> keys / values
        self.proj_emb = nn.Linear(emb_dim, D)                     # time (+ pooled text) embedding -> one more token
        self.queries = nn.Parameter(torch.zeros(T, D))            # zero-initialised query tokens
        self.pos = nn.Parameter(0.02 * torch.randn(T, D))        # learned positions: which layer a token is for
        self.layers = nn.ModuleList([DecoderLayer(D, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, R * R)
        nn.init.normal_(self.head.weight, std=0.02 / math.sqrt(D)), nn.init.zeros_(self.head.bias)
        self.a_aux = nn.ParameterList([nn.Parameter(torch.randn(R, t.in_features) / math.sqrt(t.in_features))
                                       for t in targets])
        self.b_aux = nn.ParameterList([nn.Parameter(torch.zeros(t.out_features, R)) for t in targets])

    def forward(self, tokens: Tensor, emb: Tensor) -> lora.Factors:
        """Encoded features -> {target: (A (B, R, I), B (B, O, R))}."""
        dtype = self.proj.weight.dtype
        kv = torch.cat([self.proj(tokens.to(dtype)), self.proj_emb(emb.to(dtype))[:, None]], dim=1)  # (B, L+1, D)
        q = (self.queries + self.pos).expand(kv.shape[0], -1, -1)                                    # (B, T, D)
        for layer in self.layers:
            q = layer(q, kv)
        R = self.cfg.rank
        M = rearrange(self.head(self.ln_f(q)), "B T (R S) -> B T R S", R=R)                         # (B, T, R, R)
        M = M + torch.eye(R, device=M.device, dtype=M.dtype)
        return {t.name: (M[:, i] @ self.a_aux[i], self.b_aux[i].expand(M.shape[0], -1, -1))
                for i, t in enumerate(self.targets)}


def frozen_targets(cfg: HyperConfig, backbone: Backbone) -> list[lora.Target]:
    """Check that `cfg` fits `backbone`, freeze the generator, and return its LoRA target layers (shared by
    HyperAlign and the static-LoRA baseline, which differ only in where Δθ comes from)."""
    if cfg.backbone != backbone.kind:
        raise ValueError(f"config is for a {cfg.backbone!r} backbone, the model is {backbone.kind!r}")
    backbone.model.requires_grad_(False)
    return lora.find_targets(backbone.model, cfg.targets)


class HyperAlign(nn.Module):
    """Backbone (frozen, not a submodule: never saved, never trained) + HyperNet (trained)."""
    def __init__(self, cfg: HyperConfig, backbone: Backbone):
        super().__init__()
        targets = frozen_targets(cfg, backbone)
        self.cfg, self.backbone = cfg, backbone
        backbone.encoder_depth = cfg.encoder_depth
        feat_dim, emb_dim = backbone.feature_dims()
        self.hypernet = HyperNet(cfg, targets, feat_dim, emb_dim)

    def factors(self, x_t: Tensor, t: Tensor, cond) -> lora.Factors:
        """Δθ_t = H(E(x_t, t, c)) (Eq. 7), per sample."""
        return self.hypernet(*self.backbone.features(x_t, t, cond))

    def merged(self, factors: lora.Factors) -> dict[str, Tensor]:
        """θ + Δθ for the target weights: (O, I) each for one sample, (B, O, I) for several."""
        return lora.merged_params(self.backbone.model, lora.squeeze_single(factors), self.cfg.scale)

    def predict(self, factors: lora.Factors | None, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """f_{θ+Δθ}(x_t, t, cond); factors None: the base model f_θ."""
        return self.backbone.forward(None if factors is None else self.merged(factors), x_t, t, cond)

    def substituted(self, factors: lora.Factors):
        """Context: the frozen model runs with θ + Δθ for one sample's factors until the block exits. Training puts
        forward *and* backward inside it, so gradient checkpointing recomputes with the same weights (lora.py)."""
        assert all(A.dim() == 2 for A, _ in lora.squeeze_single(factors).values()), "one sample's factors"
        return lora.substituted(self.backbone.model, self.merged(factors))

    def sampler_model(self, cond, variant: str | None = None) -> "Modulated":
        """A fresh model callable for one trajectory of the samplers; `cond` is the B prompts' conditioning."""
        return Modulated(self, cond, variant or self.cfg.variant)


def load(folder: str, backbone: Backbone, device=None) -> tuple[HyperAlign, dict]:
    """Rebuild a trained HyperAlign from a train.py output folder (config.json + hypernet.safetensors) on a frozen
    backbone; the variant and P's key times come from the config. Returns (model, the saved config dict)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {folder}: not a HyperAlign checkpoint folder (train.py --out)")
    with open(path) as f:
        saved = json.load(f)
    ha = HyperAlign(HyperConfig(**saved["hyper"]), backbone)
    weights = os.path.join(folder, "hypernet.safetensors")
    if not os.path.isfile(weights):
        raise ValueError(f"no hypernet.safetensors in {folder}")
    sd = load_file(weights)
    check_state_dict(ha.hypernet, sd, f"{weights} (a hypernetwork for another model?)")  # WeightsError: a ValueError
    ha.hypernet.load_state_dict(sd, strict=True)
    return (ha.to(device) if device is not None else ha), saved


def count_params(cfg: HyperConfig, make_model: Callable[[], nn.Module], **backbone_kw) -> int:
    """Trainable parameters of the hypernetwork for a backbone, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = make_model()
        return sum(p.numel() for p in HyperAlign(cfg, Backbone(cfg.backbone, model, **backbone_kw)).parameters())


# ---------------------------------------------------------------------------------------------------------- variants

def cond_rows(cond, idx) -> object:
    """The rows `idx` of a conditioning (tensor, or flux_cond dict of tensors)."""
    if isinstance(cond, dict):
        return {k: (v[idx] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in cond.items()}
    return cond[idx]


def segment(variant: str, t: float, key_times: tuple[float, ...]) -> float | None:
    """Which LoRA serves time t: S one per time, I one for all, P one per segment starting at a key time.

    Times decrease along a trajectory (VP timesteps and flow times alike), so t's segment is the smallest key time
    >= t; a time before every key time (the first steps) belongs to the first segment.
    """
    if variant == "S":
        return t
    if variant == "I":
        return None
    started = [k for k in key_times if k >= t - 1e-6]
    return min(started) if started else math.inf


class Modulated:
    """The sampler-facing model `model(x_t, t, cond) -> prediction` with HyperAlign's LoRA, for one trajectory.

    The model batch may hold K copies of the B samples stacked as (K B) (classifier-free guidance): every copy uses
    its sample's LoRA, computed from the first copy's x_t and the prompt conditioning given here. New LoRA weights are
    made when the segment changes: every step (S), at the first step only (I), at P's key steps (P).
    """
    def __init__(self, ha: HyperAlign, cond, variant: str):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.ha, self.cond, self.variant = ha, cond, variant
        self.n = (cond["txt"] if isinstance(cond, dict) else cond).shape[0]
        self._segment, self._params, self.calls = object(), None, 0

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        t_vec = torch.as_tensor(t, device=x_t.device)
        t_vec = t_vec.expand(x_t.shape[0]) if t_vec.dim() == 0 else t_vec
        # NOTE: only P reads t on the host. S (a new segment every call: one call per step) and I (one segment) must
        # not: float() of a GPU tensor waits for the queued steps, which left the GPU idle while the next step was
        # launched (SD1.5 on an H100: +0.2 s over 50 steps).
        seg = (object() if self.variant == "S" else None if self.variant == "I" else
               segment(self.variant, float(t_vec[0]), self.ha.cfg.key_times))
        if seg != self._segment:
            self._segment, self.calls = seg, self.calls + 1
            # the merged weights are kept for the segment: a reused LoRA costs nothing per step (I, P)
            self._params = self.ha.merged(self.ha.factors(x_t[:self.n], t_vec[:self.n], self.cond))
        return self.ha.backbone.forward(self._params, x_t, t_vec, cond)


def key_steps(x0_hats: Tensor, k: int) -> list[int]:
    """P's segment starts from the curvature of the one-step predictions along base trajectories.

    x0_hats (N, B, ...): the base model's x0_hat at each of N steps for B calibration prompts.
    delta_i = ||x0_hat_i - x0_hat_{i-1}|| / ||x0_hat_{i-1}||   (relative change, DyMO's rule), i = 1..N-1
    kappa_i = |delta_{i+1} - delta_i|                          (its discrete change: the curvature), i = 1..N-2
    Returns step 0 plus the k steps of largest mean curvature, sorted (ties: the earlier step), deterministic.
    NOTE: the paper plots delta and speaks of a 'curvature rate' without the exact rule; this is ours.
    """
    x = x0_hats.flatten(2).double()                                              # (N, B, -)
    delta = (x[1:] - x[:-1]).norm(dim=-1) / x[:-1].norm(dim=-1).clamp_min(1e-12)  # (N-1, B): delta_{1..N-1}
    kappa = (delta[1:] - delta[:-1]).abs().mean(dim=1)                           # (N-2,): kappa_{1..N-2}
    ranked = sorted(range(len(kappa)), key=lambda i: (-round(kappa[i].item(), 12), i))
    return sorted({0, *[i + 1 for i in ranked[:k]]})


# ------------------------------------------------------------------------------------------------------------ losses

def reward_loss(ha: HyperAlign, factors: lora.Factors, x_t: Tensor, t: Tensor, cond, uncond, guidance: float,
                decode: Callable[[Tensor], Tensor], reward: Callable, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """L_R = -r(D(x0_hat(x_t))) for the modulated model's one-step prediction (the paper's reward objective).

    x_t comes from a rollout without gradient; the gradient flows through this one model step (and the decoder)
    into the hypernetwork's factors. With `uncond` the prediction is classifier-free guided (as in sampling), the
    two copies sharing the sample's LoRA. Returns (loss, reward per sample).
    """
    if uncond is not None:
        u, c = ha.predict(factors, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        pred = u + guidance * (c - u)
    else:
        pred = ha.predict(factors, x_t, t, cond)
    images = decode(ha.backbone.x0_hat(x_t, t, pred))                # (B, 3, H, W) in [0, 1]
    r = reward(images, prompts)                                      # (B,)
    return -r.mean(), r.detach()


def regularisation_loss(ha: HyperAlign, factors: lora.Factors, x0: Tensor, eps: Tensor, t: Tensor, cond) -> Tensor:
    """L_G: the modulated model's denoising loss on preferred images x0 (eps target for VP, velocity for flow)."""
    pred = ha.predict(factors, ha.backbone.noised(x0, eps, t), t, cond)
    return F.mse_loss(pred.float(), ha.backbone.target(x0, eps, t).float())
