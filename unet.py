"""The Stable Diffusion 1.5 U-Net, written out by hand; module names are the diffusers checkpoint keys.

    unet(x_t, t, context) -> eps (or v, per the scheduler's prediction_type; the U-Net does not know which)

Architecture (Rombach et al. 2022, Fig. 3 / Appendix; Ho et al. 2020 for the ResNet + sinusoidal time embedding):
  time embedding: sinusoidal(t) -> Linear -> SiLU -> Linear                                      `time_embedding`
  down path:  conv_in, then per level `layers_per_block` x (ResNet [+ spatial transformer]) + stride-2 conv
  middle:     ResNet, spatial transformer, ResNet
  up path:    per level (layers_per_block + 1) x (concat skip, ResNet [+ spatial transformer]) + 2x upsample
  spatial transformer: GroupNorm -> proj_in -> blocks of (self-attn, cross-attn on the text context, GEGLU MLP)
                       -> proj_out, plus residual

Shape alphabet: B batch, C channels, H W latent height/width, L = H*W tokens, S text tokens (77), E text width,
N heads, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

import presets


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attn: tuple[bool, ...] = (True, True, True, False)  # per down level; the up path mirrors it
    layers_per_block: int = 2
    num_heads: tuple[int, ...] = (8, 8, 8, 8)                  # per level; head dim = channels / heads (40..160)
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)         # transformer blocks per spatial transformer, per level
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False                        # SD1.5: 1x1 convs; SD2: Linear
    flip_sin_to_cos: bool = True
    freq_shift: int = 0

    def __post_init__(self):
        ch, n = self.block_out_channels, len(self.block_out_channels)
        if not (n and all(isinstance(c, int) and c > 0 for c in ch) and self.layers_per_block >= 1):
            raise ValueError(f"block_out_channels {ch} and layers_per_block {self.layers_per_block} describe no U-Net")
        if not (len(self.cross_attn) == len(self.num_heads) == len(self.transformer_layers) == n):
            raise ValueError(f"per-level settings must have {n} entries (one per level)")
        bad = [(c, h) for c, h in zip(ch, self.num_heads) if not (isinstance(h, int) and h > 0 and c % h == 0)]
        if bad or any(c % self.norm_num_groups for c in ch):
            raise ValueError(f"attention heads {self.num_heads} / norm groups {self.norm_num_groups} do not divide "
                             f"the channels {ch}")

    @classmethod
    def preset(cls, name: str) -> "UNetConfig":
        return presets.pick(PRESETS, name, "U-Net")

    @classmethod
    def from_diffusers(cls, config: dict) -> "UNetConfig":
        """Read a diffusers `UNet2DConditionModel` config.json dict; unsupported settings raise ValueError.

        NOTE: in SD1.x configs `attention_head_dim` is the *number of heads* (a diffusers naming accident);
        `num_attention_heads`, when set, takes precedence.
        """
        down = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        n = len(down)
        bad = [t for t in down if t not in ("CrossAttnDownBlock2D", "DownBlock2D")]
        cross = tuple(t == "CrossAttnDownBlock2D" for t in down)
        if [t == "CrossAttnUpBlock2D" for t in up] != list(cross[::-1]):
            bad.append(f"up_block_types {up} do not mirror down_block_types {down}")
        for key, ok in [("mid_block_type", "UNetMidBlock2DCrossAttn"), ("act_fn", "silu"),
                        ("resnet_time_scale_shift", "default"), ("time_embedding_type", "positional"),
                        ("attention_type", "default"), ("class_embed_type", None), ("addition_embed_type", None),
                        ("encoder_hid_dim", None), ("time_cond_proj_dim", None), ("time_embedding_dim", None),
                        ("timestep_post_act", None), ("cross_attention_norm", None), ("only_cross_attention", None),
                        ("dual_cross_attention", None), ("center_input_sample", None), ("resnet_skip_time_act", None),
                        ("mid_block_only_cross_attention", None), ("conv_in_kernel", 3), ("conv_out_kernel", 3),
                        ("downsample_padding", 1), ("mid_block_scale_factor", 1), ("resnet_out_scale_factor", 1)]:
            val = config.get(key, ok)
            val = any(val) if isinstance(val, (list, tuple)) else val
            if (val or None) != (ok or None):
                bad.append(f"{key}={config[key]}")
        if not isinstance(config.get("layers_per_block", 2), int):
            bad.append(f"layers_per_block={config['layers_per_block']} (per-level lists)")
        if bad:
            raise ValueError(f"unsupported UNet2DConditionModel config: {bad}")

        def per_level(v, default):
            v = default if v is None else v
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n

        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in config.items() if k in known and v is not None}
        kw.update(block_out_channels=tuple(config.get("block_out_channels", cls.block_out_channels)),
                  cross_attn=cross, num_heads=per_level(heads, 8),
                  transformer_layers=per_level(config.get("transformer_layers_per_block"), 1))
        if isinstance(kw.get("cross_attention_dim"), (list, tuple)):
            raise ValueError("unsupported UNet2DConditionModel config: per-level cross_attention_dim")
        return cls(**kw)


PRESETS = {
    "sd15": UNetConfig(),
    # a tiny U-Net with the same code paths, for tests and the toy world
    "toy-sd": UNetConfig(block_out_channels=(32, 64), cross_attn=(True, False), layers_per_block=1, num_heads=(2, 4),
                         transformer_layers=(1, 1), cross_attention_dim=32, norm_num_groups=8),
}


# ---------------------------------------------------------------------------------------------------- time embedding

def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
    """Sinusoidal embedding of (B,) timesteps (Vaswani et al. 2017, sec. 3.5; DDPM appendix B) -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(c_in, c_out)
        self.linear_2 = nn.Linear(c_out, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# --------------------------------------------------------------------------------------------------------- ResNet

class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, c_emb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=eps)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_emb_proj = nn.Linear(c_emb, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=eps)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C, 1, 1): time conditions every pixel
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


# ----------------------------------------------------------------------------------------------- spatial transformer

class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None (attn1), cross-attention otherwise (attn2).

    The projections are plain nn.Linear modules called as modules, so LoRA can substitute their parameters
    through torch.func.functional_call (see lora.py).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0 kept for the diffusers key `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(p, "B L (N D) -> B N L D", N=self.heads)
                   for p in (self.to_q(x), self.to_k(context), self.to_v(context)))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D)) v, (B, N, L, D)
        return self.to_out[0](rearrange(h, "B N L D -> B L (N D)"))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): x W1 * gelu(x W2), the two halves of one projection."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # NOTE: index 1 is a dropout in diffusers (p=0, no parameters); a no-op keeps the key `net.2`
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer2DModel: the image as L = H*W tokens attending to themselves and to the text context."""

    def __init__(self, c: int, heads: int, layers: int, context_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)  # NOTE: 1e-6 here, 1e-5 in the ResNets (as in SD)
        self.proj_in = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(c, heads, context_dim) for _ in range(layers)])
        self.proj_out = nn.Linear(c, c) if linear else nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "B C H W -> B (H W) C")
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, L, C)
        if self.linear:
            h = self.proj_out(h)
        h = rearrange(h, "B (H W) C -> B C H W", H=H, W=W).contiguous()  # NOTE: else convs see channels-last
        if not self.linear:
            h = self.proj_out(h)
        return x + h


# ------------------------------------------------------------------------------------------------------ U-Net levels

class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # size of the matching skip (odd sizes too)


class Level(nn.Module):
    """One U-Net level: resnets[i] (+ attentions[i]) pairs, then an optional down- or up-sampler.

    Down levels (CrossAttnDownBlock2D / DownBlock2D) return every output as a skip; up levels
    (CrossAttnUpBlock2D / UpBlock2D) take one skip (last first) before each ResNet and concatenate it on channels.
    """

    def __init__(self, resnets: list[ResnetBlock], attentions: list[SpatialTransformer] | None,
                 down: int | None = None, up: int | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if attentions:
            self.attentions = nn.ModuleList(attentions)
        if down:
            self.downsamplers = nn.ModuleList([Downsample(down)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(up)])

    def forward(self, h, emb, context, skips: list[torch.Tensor] | None = None, size: tuple[int, int] | None = None):
        """Down level: skips=None, returns (h, outputs). Up level: returns (h, []); `size` is the upsampled H, W."""
        attentions = getattr(self, "attentions", [None] * len(self.resnets))
        skips, outs = list(skips) if skips is not None else None, []
        for resnet, attn in zip(self.resnets, attentions):
            if skips is not None:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = resnet(h, emb)
            if attn is not None:
                h = attn(h, context)
            outs.append(h)
        if hasattr(self, "downsamplers"):
            h = self.downsamplers[0](h)
            outs.append(h)
        if hasattr(self, "upsamplers"):
            h = self.upsamplers[0](h, size)
        return h, (outs if skips is None else [])


class MidBlock(nn.Module):
    def __init__(self, c: int, c_emb: int, heads: int, layers: int, cfg: UNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.attentions = nn.ModuleList([SpatialTransformer(c, heads, layers, cfg.cross_attention_dim, g,
                                                            cfg.use_linear_projection)])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, c_emb, g, eps), ResnetBlock(c, c, c_emb, g, eps)])

    def forward(self, h, emb, context):
        h = self.resnets[0](h, emb)
        return self.resnets[1](self.attentions[0](h, context), emb)


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch, n, L, g, eps = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block, \
            cfg.norm_num_groups, cfg.norm_eps
        c_emb = 4 * ch[0]

        def transformer(c, level):
            return SpatialTransformer(c, cfg.num_heads[level], cfg.transformer_layers[level],
                                      cfg.cross_attention_dim, g, cfg.use_linear_projection)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], c_emb)
        self.down_blocks = nn.ModuleList([
            Level([ResnetBlock(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i], c_emb, g, eps) for j in range(L)],
                  [transformer(ch[i], i) for _ in range(L)] if cfg.cross_attn[i] else None,
                  down=ch[i] if i < n - 1 else None)
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], c_emb, cfg.num_heads[-1], cfg.transformer_layers[-1], cfg)
        up_blocks = []
        for i in reversed(range(n)):  # up level k = n-1-i mirrors down level i
            c_skip = [ch[i]] * L + [ch[max(i - 1, 0)]]  # skips popped in order: this level's resnets, then below
            c_prev = ch[min(i + 1, n - 1)]
            resnets = [ResnetBlock((c_prev if j == 0 else ch[i]) + c_skip[j], ch[i], c_emb, g, eps)
                       for j in range(L + 1)]
            up_blocks.append(Level(resnets, [transformer(ch[i], i) for _ in range(L + 1)] if cfg.cross_attn[i]
                                   else None, up=ch[i] if i > 0 else None))
        self.up_blocks = nn.ModuleList(up_blocks)
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def down(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor):
        """Time embedding, conv_in and the down path: (h, skips, emb).

        This is the hypernetwork's perception encoder ("the pretrained U-Net's down blocks") and the first half of
        `forward`. x (B, C, H, W), t (B,) or scalar, context (B, S, E).
        """
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        cfg = self.config
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(x.dtype))  # (B, 4*C0)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, outs = self._run(block, h, emb, context)
            skips += outs
        return h, skips, emb  # h (B, C_last, H/2^(n-1), W/2^(n-1)); skips = diffusers' down_block_res_samples

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor) -> torch.Tensor:
        h, skips, emb = self.down(x, t, context)
        h = self._run(self.mid_block, h, emb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[-2:] if skips else None
            h, _ = self._run(block, h, emb, context, level_skips, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)


def make_unet(cfg: UNetConfig | str, **overrides) -> UNet:
    cfg = UNetConfig.preset(cfg) if isinstance(cfg, str) else cfg
    return UNet(replace(cfg, **overrides))
