"""HyperAlign (Xie, Guo, Gong, arXiv 2601.15968): a hypernetwork that writes LoRA weights for a frozen text-to-image
model from the current state (x_t, t, c), trained with a reward loss regularised by preference data (the loss: losses.py).

    features = E(x_t, t, c)                      frozen perception encoder (U-Net down blocks / FLUX embedders + blocks)
    Δθ_t     = H(features)                       Linear -> transformer decoder (zero-init queries) -> Linear   (Eq. 7)
    pred     = f_{θ + Δθ_t}(x_t, t, c)           the frozen generator run with θ + Δθ_t (lora.py)
    L        = L_R + λ L_G                       reward of the one-step prediction + denoising loss on preferred data

Sections:
  # ---- config        HyperConfig and named presets
  # ---- hypernetwork  the decoder with one query token per target layer, and the generated LoRA (Δθ = 0 at init)
  # ---- variants      S / I / P: the one segment rule, the sampler-facing model, P's key steps

Shape alphabet: B samples, K copies of a sample in the model batch (CFG: 2), L feature tokens, F feature width,
E embedding width, T target layers (= query tokens), D decoder width, R LoRA rank, I / O in / out features,
N sampling steps.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import backbone
import distributed
import lora
import presets
from backbone import Backbone

if TYPE_CHECKING:
    from pipeline import Pipeline

VARIANTS = ("S", "I", "P")
# NOTE: the decoder's head starts at 1/100 of nn.Linear's default scale, so that the generated core M(x) is small at
# initialisation. At the default scale, M(x)'s entries are O(1), Δθ is a small difference of two large products, and
# the hypernetwork could not learn even "+u for one prompt, -u for another" (tests/test_hyperalign.py: its loss stayed
# above that of Δθ = 0 at every learning rate tried); with M(x) small it learns it within 400 steps (adaptivity 0.998).
HEAD_GAIN = 0.01


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
    key_steps: tuple[int, ...] = ()           # P: steps where a segment starts (0 first), set by calibration ...
    key_of: int = 0                           # ... for a trajectory of this many steps (rescaled for others)

    def __post_init__(self):
        self.targets, self.key_steps = tuple(self.targets), tuple(self.key_steps)
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
        return presets.pick(PRESETS, name, "HyperAlign", **overrides)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def lora_step_for(self, k: int, steps: int) -> int:
        """The step whose state makes the LoRA used at step k of a `steps`-step trajectory (lora_step, this
        config's variant and key steps)."""
        return lora_step(self.variant, k, self.key_steps_for(steps))

    def key_steps_for(self, steps: int) -> tuple[int, ...]:
        """P's key steps for a trajectory of `steps` steps: calibrated ones rescaled by position (always with 0)."""
        if not self.key_of or steps == self.key_of:
            return tuple(sorted({0, *self.key_steps}))
        return tuple(sorted({0, *(min(steps - 1, round(k * steps / self.key_of)) for k in self.key_steps)}))


PRESETS: dict[str, HyperConfig] = {
    "sd15": HyperConfig(),
    "flux-dev": HyperConfig(backbone="flow", targets=lora.FLUX_TARGETS, encoder_depth=2),
    "toy-sd": HyperConfig(rank=4, alpha=4.0, d_model=64, n_layer=1, n_head=4),
    "toy-flux": HyperConfig(backbone="flow", targets=lora.FLUX_TARGETS, rank=4, alpha=4.0, d_model=64, n_layer=1,
                            n_head=4, encoder_depth=1),
}


# ------------------------------------------------------------------------------------------------------ hypernetwork

class Attention(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        q, k, v = (rearrange(p, "B L (N D) -> B N L D", N=self.n_head) for p in (self.q(x), self.k(kv), self.v(kv)))
        return self.o(rearrange(F.scaled_dot_product_attention(q, k, v), "B N L D -> B L (N D)"))

    def weights(self, x: Tensor, kv: Tensor) -> Tensor:
        """The attention weights forward uses, (B, N, L_x, L_kv): softmax(q kᵀ / √d) (diagnostics.py reads them)."""
        q, k = (rearrange(p, "B L (N D) -> B N L D", N=self.n_head) for p in (self.q(x), self.k(kv)))
        return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)


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


class Decoder(nn.Module):
    """Features -> one R x R core M_T per target layer (paper Eq. 7: Linear -> transformer decoder -> Linear).

    Memory (keys / values): every feature level and the prompt's text tokens, each projected by its own Linear, and
    the time embedding as one more token; a learned embedding per source tells them apart (Fig. 3's "Linear").
    Queries: one per target layer, zero-initialised (as in the paper) plus a learned position, so that the tokens can
    tell the layers apart. Head: token T -> M_T.
    """
    def __init__(self, cfg: HyperConfig, n_targets: int, level_dims: list[int], text_dim: int, emb_dim: int):
        super().__init__()
        D, R, T = cfg.d_model, cfg.rank, n_targets
        self.rank = R
        self.proj = nn.ModuleList([nn.Linear(d, D) for d in [*level_dims, text_dim, emb_dim]])
        self.source = nn.Parameter(0.02 * torch.randn(len(self.proj), D))   # which source a memory token is from
        self.queries = nn.Parameter(torch.zeros(T, D))                         # zero-initialised query tokens
        self.pos = nn.Parameter(0.02 * torch.randn(T, D))                     # which target layer a query is for
        self.layers = nn.ModuleList([DecoderLayer(D, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, R * R, bias=False)
        with torch.no_grad():
            self.head.weight.mul_(HEAD_GAIN)                                                # M(x) small at init

    def forward(self, levels: list[Tensor], text: Tensor, emb: Tensor) -> Tensor:
        """-> M (B, T, R, R)."""
        dtype = self.head.weight.dtype
        sources = [*levels, text, emb[:, None]]                                              # each (B, L_j, F_j)
        kv = torch.cat([p(x.to(dtype)) + self.source[j] for j, (p, x) in enumerate(zip(self.proj, sources))], 1)
        q = (self.queries + self.pos).expand(kv.shape[0], -1, -1)                           # (B, T, D)
        for layer in self.layers:
            q = layer(q, kv)                                                                # kv (B, L, D)
        return rearrange(self.head(self.ln_f(q)), "B T (R S) -> B T R S", R=self.rank)


class HyperNet(nn.Module):
    """The trainable part of HyperAlign (Fig. 3): the decoder, and per target layer T the LoRA

        Δθ_T(x) = s · (B_T · M_T(x) · A_T  −  B⁰_T · M⁰_T(x) · A⁰_T)
                = s · ((B_T − B⁰_T) · M_T(x) · A_T  +  B⁰_T · (M_T(x) · A_T − M⁰_T(x) · A⁰_T))

    M_T(x) (R, R) is generated by the decoder from the input; A_T (R, I) and B_T (O, R) are learned (unit-norm rows /
    columns at initialisation). The superscript ⁰ marks frozen copies taken at initialisation (decoder₀, A⁰, B⁰): the
    generated LoRA minus its own initial value, so Δθ = 0 exactly at initialisation (every product of the second form
    has an exactly-zero factor), for every input. Every number of Δθ depends on the input through M(x): there is no
    static LoRA beside it. As LoRA factors this is one rank-2R LoRA: [B − B⁰, B⁰] · [M A ; M A − M⁰ A⁰].
    NOTE: the paper's head "maps decoded features to LoRA weights"; emitting full (O + I) x R factors per layer would
    need a head of ~10^8 parameters for SD1.5, so, like a third-party replication, we factor the LoRA through learned
    per-target matrices and generate the small core. Subtracting the initial value (rather than zeroing a factor)
    gives the decoder, A and B a gradient at the first step; the cost is one more decoder forward. Why each choice
    (and what the earlier designs did): tutorial.md, "Departures".
    """
    def __init__(self, cfg: HyperConfig, targets: list[lora.Target], level_dims: list[int], text_dim: int,
                 emb_dim: int):
        super().__init__()
        self.cfg, self.targets, R = cfg, list(targets), cfg.rank
        self.decoder = Decoder(cfg, len(targets), level_dims, text_dim, emb_dim)
        self.a = nn.ParameterList([nn.Parameter(F.normalize(torch.randn(R, t.in_features), dim=1))
                                   for t in targets])
        self.b = nn.ParameterList([nn.Parameter(F.normalize(torch.randn(t.out_features, R), dim=0))
                                   for t in targets])
        self.decoder0 = copy.deepcopy(self.decoder).requires_grad_(False)            # the ⁰ copies: frozen at init
        shapes = [(t.in_features, t.out_features) for t in targets]
        self.groups = [[i for i, s in enumerate(shapes) if s == shape] for shape in dict.fromkeys(shapes)]
        self.a0 = copy.deepcopy(self.a).requires_grad_(False)
        self.b0 = copy.deepcopy(self.b).requires_grad_(False)

    def forward(self, levels: list[Tensor], text: Tensor, emb: Tensor) -> lora.Factors:
        """Encoded features -> {target: (A (B, 2R, I), B (B, O, 2R))}: the LoRA of each target, per sample."""
        with torch.no_grad():
            M0 = self.decoder0(levels, text, emb)                                            # (B, T, R, R)
        M, n, out = self.decoder(levels, text, emb), M0.shape[0], {}
        # NOTE: read each list once: indexing an nn.ParameterList costs ~2 us per item (4 x 56 items on toy SD)
        lists = [list(p.parameters(recurse=False)) for p in (self.a, self.a0, self.b, self.b0)]
        for idx in self.groups:                   # targets of one shape together: one product for all of them
            a, a0, b, b0 = (torch.stack([p[i] for i in idx]) for p in lists)
            MA = M[:, idx] @ a                                                               # (B, G, R, I)
            A = torch.cat([MA, MA - M0[:, idx] @ a0], dim=2)                                 # (B, G, 2R, I)
            B = torch.cat([b - b0, b0], dim=2).expand(n, -1, -1, -1)                         # (B, G, O, 2R)
            out.update({self.targets[i].name: (A[:, j], B[:, j]) for j, i in enumerate(idx)})
        return {t.name: out[t.name] for t in self.targets}


def frozen_targets(cfg: HyperConfig, backbone: Backbone) -> list[lora.Target]:
    """Check that `cfg` fits `backbone`, freeze the generator, and return its LoRA target layers (shared by
    HyperAlign and the static-LoRA baseline, which differ only in where Δθ comes from)."""
    if cfg.backbone != backbone.kind:
        raise ValueError(f"config is for a {cfg.backbone!r} backbone, the model is {backbone.kind!r}")
    backbone.model.requires_grad_(False)
    return lora.find_targets(backbone.model, cfg.targets)


class HyperAlign(nn.Module):
    """Backbone (frozen, not a submodule: never saved, never trained) + HyperNet (trained)."""
    kind = "hyperalign"                                   # what a run folder records (runs.py)

    def __init__(self, cfg: HyperConfig, backbone: Backbone):
        super().__init__()
        targets = frozen_targets(cfg, backbone)
        self.cfg, self.backbone = cfg, backbone
        backbone.encoder_depth = cfg.encoder_depth
        self.hypernet = HyperNet(cfg, targets, *backbone.feature_dims())

    @property
    def trainable(self) -> nn.Module:
        """The part training optimises and a run folder saves."""
        return self.hypernet

    def factors(self, x_t: Tensor, t: Tensor, cond, net: nn.Module | None = None) -> lora.Factors:
        """Δθ_t = H(E(x_t, t, c)) (Eq. 7), per sample. `net`: the hypernetwork wrapped for DDP (training)."""
        return (net or self.hypernet)(*self.backbone.features(x_t, t, cond))

    def prepared(self, factors: lora.Factors) -> lora.Weights:
        """θ + Δθ ready to run (lora.prepare): merged weights for one sample, per-sample LoRAs for several."""
        return lora.prepare(self.backbone.model, factors, self.cfg.scale)

    @contextmanager
    def applied(self, factors: lora.Factors) -> Iterator[Callable]:
        """Inside the block, `model(x_t, t, cond)` runs θ + Δθ, each sample of the batch with its own LoRA. Training
        puts forward *and* backward inside it, so gradient checkpointing recomputes with the same LoRA."""
        with lora.applied(self.backbone.model, self.prepared(factors)):
            yield self.backbone

    def sampler_model(self, cond, steps: int, variant: str | None = None, fast=None) -> "Modulated":
        """A fresh model callable for one trajectory of `steps` sampler steps; `cond` is the B prompts' conditioning.
        `fast`: an accel.Fast call to run the model through (one sample at a time)."""
        return Modulated(self, cond, steps, variant or self.cfg.variant, fast)


def count_params(cfg: HyperConfig, make_model: Callable[[], nn.Module], **backbone_kw) -> int:
    """Trainable parameters of the hypernetwork for a backbone, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = make_model()
        if cfg.backbone == "vp" and "schedule" not in backbone_kw:
            import sampler
            backbone_kw["schedule"] = sampler.VPSchedule.from_config(None)
        net = HyperAlign(cfg, backbone.make(cfg.backbone, model, **backbone_kw)).hypernet
        return sum(p.numel() for p in net.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------- variants

def lora_step(variant: str, k: int, key_steps: tuple[int, ...]) -> int:
    """The one S / I / P rule: the trajectory step whose state x_s makes the LoRA used at step k (0 = x_T).

    S: every step makes its own (s = k); I: the first step's serves all (s = 0); P: the LoRA of k's segment, made at
    the last key step <= k (key steps always include 0). Sampling (Modulated) and training (losses.draw, through
    HyperConfig.lora_step_for) both ask this function, so the two cannot disagree.
    """
    if variant == "S":
        return k
    if variant == "I":
        return 0
    return max([s for s in key_steps if s <= k], default=0)


class Modulated:
    """The sampler-facing model `model(x_t, t, cond) -> prediction` with HyperAlign's LoRA, for one trajectory.

    The samplers call it once per step, so the call count is the step index k; a new LoRA is made when
    lora_step(k) == k (every step for S, the first for I, P's key steps), from each sample's x_t and the prompt
    conditioning given here, and kept for the segment, prepared to run (lora.prepare: merged weights for one sample,
    per-sample LoRAs for several), so that a reused LoRA costs nothing per step.
    NOTE: the step comes from counting, never from reading t: reading a GPU tensor on the host waits for the queued
    work and leaves the GPU idle while the next step is launched.

    The model batch may hold K copies of each of the B samples, a sample's copies adjacent, (B K) (classifier-free
    guidance, sampler.guided): every copy uses its sample's LoRA, made from the sample's state.
    """
    def __init__(self, ha: HyperAlign, cond, steps: int, variant: str, fast=None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.ha, self.cond, self.variant, self.fast = ha, cond, variant, fast
        self.key_steps = ha.cfg.key_steps_for(steps)
        self.n = (cond["txt"] if isinstance(cond, dict) else cond).shape[0]
        if fast is not None and self.n != 1:
            raise ValueError(f"the fast path samples one image at a time (its LoRA in static buffers), got {self.n}")
        self.step, self._weights = 0, None
        self.keep, self.made = False, []          # keep=True: every LoRA made, [(step, factors)] (export_lora.py)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        if lora_step(self.variant, self.step, self.key_steps) == self.step:
            if self.fast is not None:                     # the perception encoder is the frozen model: base weights
                self.fast.weights.reset()
            k = x_t.shape[0] // self.n                   # copies of each sample, adjacent (sampler.guided)
            factors = self.ha.factors(x_t[::k], t[::k], self.cond)
            if self.keep:
                self.made.append((self.step, factors))
            self._weights = self.ha.prepared(factors)
            if self.fast is not None:                     # merged into the static weights the captured call reads
                self.fast.weights.load(self._weights)
        self.step += 1
        if self.fast is not None:
            return self.fast(x_t, t, cond)
        return self.ha.backbone.forward(self._weights, x_t, t, cond)


def curvature(x0_hats: Tensor) -> tuple[Tensor, Tensor]:
    """The curvature of the one-step predictions along trajectories (paper Fig. 4).

    x0_hats (N, B, ...): x0_hat at each of N steps for B trajectories.
    delta_i = ||x0_hat_i - x0_hat_{i-1}|| / ||x0_hat_{i-1}||   (relative change, DyMO's rule), i = 1..N-1: (N-1, B)
    kappa_i = |delta_{i+1} - delta_i|                          (its discrete change: the curvature), i = 1..N-2: (N-2, B)
    """
    x = x0_hats.flatten(2).double()                                              # (N, B, -)
    delta = (x[1:] - x[:-1]).norm(dim=-1) / x[:-1].norm(dim=-1).clamp_min(1e-12)
    return delta, (delta[1:] - delta[:-1]).abs()


def calibrate(ha: HyperAlign, pipe: "Pipeline", prompts: list[str], k: int, seed: int,
              ctx: distributed.Context = distributed.Context()) -> list[int]:
    """P: key steps from the curvature of base trajectories over calibration prompts (fixed seed), stored in ha.cfg
    with the trajectory length they are for; under torchrun rank 0's on every rank."""
    cond, uncond = pipe.conds(prompts)
    traj = pipe.rollout(pipe.backbone, pipe.noise(len(prompts), torch.Generator().manual_seed(seed)), cond, uncond)
    steps = distributed.broadcast(key_steps(traj["x0_hat"], k), ctx)
    ha.cfg.key_steps, ha.cfg.key_of = tuple(steps), pipe.steps
    if ctx.main:
        print(f"P: key steps {steps} of {pipe.steps}")
    return steps


def key_steps(x0_hats: Tensor, k: int) -> list[int]:
    """P's segment starts: step 0 plus k steps of large mean curvature over base trajectories, sorted, deterministic.

    kappa_i is charged to step i + 1, where the prediction has turned. Steps are taken in order of curvature (ties:
    the earlier step), skipping any closer than gap = max(1, N // (2 (k + 1))) steps to one already taken, so that the
    segments are not a run of one-step segments where the curvature is high (the first steps, on every toy model).
    NOTE: the paper plots delta and speaks of a 'curvature rate' without the exact rule; this is ours.
    """
    N = x0_hats.shape[0]
    kappa = curvature(x0_hats)[1].mean(dim=1)                                    # (N-2,)
    gap, chosen = max(1, N // (2 * (k + 1))), [0]
    for i in sorted(range(len(kappa)), key=lambda i: (-round(kappa[i].item(), 12), i)):
        if len(chosen) == k + 1:
            break
        if all(abs(i + 1 - s) >= gap for s in chosen):
            chosen.append(i + 1)
    return sorted(chosen)
