"""FLUX.1: the rectified-flow MM-DiT of Black Forest Labs, written out by hand.

Module names are BFL's checkpoint keys (`double_blocks.3.img_attn.qkv`, `single_blocks.0.linear1`,
`final_layer.adaLN_modulation.1`, ...), so a BFL file loads with `load_state_dict(strict=True)`; diffusers folders are
converted by rules in weights.py. Numerically this is black-forest-labs/flux `model.py` + `layers.py`:

    img (packed latents), txt (T5 states) --img_in / txt_in--> tokens
    vec = time_in(t) [+ guidance_in(g)] + vector_in(y)              y = CLIP-L pooled text
    19 double blocks: separate img / txt weights, one joint attention over [txt, img]
    38 single blocks: one stream over [txt, img], attention and MLP in parallel
    final layer on the img tokens -> v, the velocity of the flow x_t = (1 - t) x0 + t eps

Shapes: B batch, L tokens (L_txt + L_img), C packed latent channels (16 latent channels x 2 x 2 = 64),
W hidden width, M MLP width (4 W), N heads, D head dim (W = N D), K = 3 for (q, k, v).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import presets


@dataclass
class FluxConfig:
    in_channels: int = 64  # packed latent channels C
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL hidden states
    hidden_size: int = 3072  # W
    mlp_ratio: float = 4.0
    num_heads: int = 24  # N
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE dims per id axis (time, row, column); sums to D
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev is guidance-distilled, schnell is not

    def __post_init__(self):
        self.axes_dim = tuple(self.axes_dim)
        sizes = (self.in_channels, self.out_channels, self.vec_in_dim, self.context_in_dim, self.hidden_size,
                 self.num_heads)
        if not all(isinstance(v, int) and v > 0 for v in sizes) or self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError(f"sizes and head counts must be positive integers, got {sizes}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(f"axes_dim {self.axes_dim} must be even and sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def preset(cls, name: str) -> "FluxConfig":
        return presets.pick(PRESETS, name, "FLUX")

    @classmethod
    def from_bfl_keys(cls, sd: Mapping[str, Tensor], axes_dim: tuple[int, ...] | None = None) -> "FluxConfig":
        """Infer the architecture from a BFL state dict (depth, width, heads, guidance, channels).

        The RoPE split `axes_dim` is not visible in the weights: head dim 128 means FLUX.1's (16, 56, 56); any other
        head dim needs `axes_dim` passed explicitly.
        """
        def count(prefix: str) -> int:
            return len({int(k.split(".")[1]) for k in sd if k.startswith(prefix)})

        def shape(k: str) -> torch.Size:
            if k not in sd:
                raise ValueError(f"not a FLUX (BFL layout) checkpoint: key {k!r} is missing")
            return sd[k].shape

        W, C = shape("img_in.weight")
        norm = next((v for k, v in sd.items() if k.endswith("query_norm.scale")), None)
        if norm is None:
            raise ValueError("not a FLUX (BFL layout) checkpoint: no attention query_norm.scale keys")
        D = norm.shape[0]
        if axes_dim is None:
            if D != 128:
                raise ValueError(f"head dim {D} is not FLUX.1's 128: pass axes_dim (RoPE dims per axis) explicitly")
            axes_dim = (16, 56, 56)
        depth, depth_single = count("double_blocks."), count("single_blocks.")
        if depth:
            mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
        else:
            mlp_hidden = shape("single_blocks.0.linear1.weight")[0] - 3 * W if depth_single else 4 * W
        return cls(
            in_channels=C, out_channels=shape("final_layer.linear.weight")[0],
            vec_in_dim=shape("vector_in.in_layer.weight")[1], context_in_dim=shape("txt_in.weight")[1],
            hidden_size=W, mlp_ratio=mlp_hidden / W, num_heads=W // D, depth=depth, depth_single_blocks=depth_single,
            axes_dim=tuple(axes_dim), qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd or not depth,
            guidance_embed="guidance_in.in_layer.weight" in sd,
        )


PRESETS: dict[str, FluxConfig] = {
    "flux-dev": FluxConfig(guidance_embed=True),
    "flux-schnell": FluxConfig(guidance_embed=False),
    # tiny configurations for tests and smoke runs: 2 heads of dim 16, RoPE split (4, 6, 6)
    "flux-tiny": FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=32,
                            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), guidance_embed=True),
    "flux-tiny-schnell": FluxConfig(in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                                    hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                                    guidance_embed=False),
}


# ------------------------------------------------------------------------------------------------------- embeddings

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding (cos, sin) of t in [0, 1]; FLUX scales t by 1000 so it covers DDPM's integer range."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, dim / 2)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)
    return emb.to(t.dtype) if torch.is_floating_point(t) else emb


def rope(ids: Tensor, axes_dim: tuple[int, ...], theta: int) -> Tensor:
    """Rotary phases for 3-axis position ids (B, L, 3) -> e^{i pos omega} as complex64 (B, 1, L, D / 2).

    Each axis a rotates its own d_a / 2 pairs with frequencies omega_j = theta^(-2j / d_a). Computed on the fly (no
    buffers, so every module tensor is a checkpoint tensor). NOTE: the angles are formed in float64 like BFL's code
    (positions reach 100s; float32 angles would be off by ~1e-5 rad), the rotation is applied in float32.
    """
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)  # (d / 2,)
        angles.append(ids[..., i, None].double() * omega)  # (B, L, d / 2)
    angles = torch.cat(angles, dim=-1)[:, None]  # (B, 1, L, D / 2)
    return torch.complex(angles.cos().float(), angles.sin().float())


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of q or k (B, N, L, D), as complex numbers x[2i] + i x[2i+1], by pe."""
    x_c = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, N, L, D / 2) complex64
    return torch.view_as_real(x_c * pe).flatten(-2).type_as(x)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ---------------------------------------------------------------------------------------------------------- blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: torch's fused kernel (float32 statistics, as BFL); BFL rounds to x's dtype before the scale, which only
        # differs in bf16, by one rounding
        return F.rms_norm(x, (x.shape[-1],), self.scale, eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with RoPE: (B, N, L, D) x3 -> (B, L, N D)."""
    q = apply_rope(q, pe)  # one at a time: the unrotated q is freed first (peak memory)
    k = apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)  # (B, N, L, D)
    return rearrange(x, "B N L D -> B L (N D)")


class SelfAttention(nn.Module):
    """The q/k/v projection and output projection of one stream; the attention itself is joint (DoubleStreamBlock)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(self.qkv(x), "B L (K N D) -> K B N L D", K=3, N=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """adaLN: vec -> (shift, scale, gate) once (single blocks) or twice (double blocks: attention, then MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, W)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        W, M = hidden_size, int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(W, double=True)
        self.img_norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(W, num_heads, qkv_bias)
        self.img_norm2 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(nn.Linear(W, M), nn.GELU(approximate="tanh"), nn.Linear(M, W))
        self.txt_mod = Modulation(W, double=True)
        self.txt_norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(W, num_heads, qkv_bias)
        self.txt_norm2 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(nn.Linear(W, M), nn.GELU(approximate="tanh"), nn.Linear(M, W))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        # each stream projects its own q, k, v; attention runs over the concatenation [txt, img]
        img_q, img_k, img_v = self.img_attn.qkv_heads((1 + img_scale1) * self.img_norm1(img) + img_shift1)
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads((1 + txt_scale1) * self.txt_norm1(txt) + txt_shift1)
        # NOTE: q, k, v passed as temporaries, so attention can free them once rotated (peak memory)
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe)  # (B, L, W)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * self.img_norm2(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * self.txt_norm2(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP (ViT-22B style): one linear1 makes q, k, v and the MLP input, linear2 merges both."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K N D) -> K B N L D", K=3, N=self.num_heads)
        attn = attention(*self.norm(q, k, v), v, pe)  # (B, L, W); normed q, k as temporaries (peak memory)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        # NOTE: BFL order is (shift, scale); diffusers' norm_out.linear stores (scale, shift) (weights.py swaps)
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


# ----------------------------------------------------------------------------------------------------------- model

class Flux(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        c = self.config = config
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth)])
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks)])
        self.final_layer = LastLayer(c.hidden_size, c.out_channels)
        self.gradient_checkpointing = False  # recompute each block in backward (training only)

    def _run(self, block: nn.Module, *args: Tensor):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
              guidance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Input embedders: -> img tokens (B, L_img, W), txt tokens (B, L_txt, W), vec (B, W), RoPE pe."""
        if img.ndim != 3 or img.shape[-1] != self.config.in_channels:
            raise ValueError(f"img must be packed latents (B, L, {self.config.in_channels}), got {tuple(img.shape)}")
        if txt.ndim != 3 or txt.shape[-1] != self.config.context_in_dim:
            raise ValueError(f"txt must be (B, L, {self.config.context_in_dim}), got {tuple(txt.shape)}")
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(img.shape[0])
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (flux-dev): pass guidance, e.g. 3.5")
            if guidance.ndim == 0:
                guidance = guidance.expand(img.shape[0])
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        # NOTE: a guidance value given to a model without guidance embedding (schnell) is ignored, as in BFL's code
        vec = vec + self.vector_in(y)
        pe = rope(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)
        return self.img_in(img), self.txt_in(txt), vec, pe

    def forward_features(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                         y: Tensor, guidance: Tensor | None = None, depth: int | None = None
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Embedders and the first `depth` double blocks (all when None) -> (img, txt, vec, pe) tokens.

        The hypernetwork's perception encoder for FLUX is this with a small `depth` on the frozen model.
        """
        img, txt, vec, pe = self.embed(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        for block in self.double_blocks[:depth]:
            img, txt = self._run(block, img, txt, vec, pe)
        return img, txt, vec, pe

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        """Velocity v (B, L_img, C_out) of packed latents img (B, L_img, C) at flow times `timesteps` in [0, 1]."""
        img, txt, vec, pe = self.forward_features(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        x = torch.cat((txt, img), dim=1)  # (B, L, W)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)  # (B, L_img, C_out)
