"""AutoencoderKL (the SD / FLUX VAE), written out by hand; module names are the diffusers checkpoint keys.

The VAE maps images x in [-1, 1] to a diagonal-Gaussian posterior over latents and back:

    encoder(x) -> (mean, logvar)                       (quant_conv applied when the layout has one: SD, not FLUX)
    encode(x)  =  scaling * (mean - shift)             the latent the diffusion model sees, z
    decode(z)  =  decoder(z / scaling + shift)         (post_quant_conv first when the layout has one)

Shape alphabet: B batch, C channels, H W height/width (pixels or latents), L = H*W tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

import presets


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    quant_conv: bool = True             # SD has 1x1 quant_conv / post_quant_conv around the latent; FLUX has none
    mid_block_add_attention: bool = True
    sample_size: int | None = None      # image size the model was trained at (diffusers' key; informational)

    def __post_init__(self):
        ch = self.block_out_channels
        if not (ch and all(isinstance(c, int) and c > 0 for c in ch) and self.layers_per_block >= 1
                and self.latent_channels >= 1 and all(c % self.norm_num_groups == 0 for c in ch)):
            raise ValueError(f"block_out_channels {ch}, latent_channels {self.latent_channels}, norm_num_groups "
                             f"{self.norm_num_groups} describe no VAE")

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        return presets.pick(PRESETS, name, "VAE")

    @classmethod
    def from_diffusers(cls, config: dict) -> "VAEConfig":
        """Read a diffusers `AutoencoderKL` config.json dict; unsupported settings raise ValueError."""
        bad = [t for t in config.get("down_block_types", []) if t != "DownEncoderBlock2D"]
        bad += [t for t in config.get("up_block_types", []) if t != "UpDecoderBlock2D"]
        if config.get("act_fn", "silu") != "silu":
            bad.append(f"act_fn={config['act_fn']}")
        quant, post_quant = config.get("use_quant_conv", True), config.get("use_post_quant_conv", True)
        if quant != post_quant:
            bad.append(f"use_quant_conv={quant} with use_post_quant_conv={post_quant}")
        if bad:
            raise ValueError(f"unsupported AutoencoderKL config: {bad}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in config.items() if k in known and v is not None}
        if "block_out_channels" in kw:
            kw["block_out_channels"] = tuple(kw["block_out_channels"])
        return cls(quant_conv=quant, **kw)


PRESETS = {
    "sd": VAEConfig(),
    "flux": VAEConfig(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
    # tiny layouts for tests and the toy world: same code paths, a few thousand parameters
    "toy-sd": VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4),
    "toy-flux": VAEConfig(latent_channels=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False),
}


# ------------------------------------------------------------------------------------------------------ building blocks

class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions (VAE mid block)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        h = rearrange(self.group_norm(x), "B C H W -> B 1 (H W) C")
        h = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))  # (B, 1, L, C)
        h = rearrange(self.to_out[0](h), "B 1 (H W) C -> B C H W", H=H, W=W).contiguous()
        return x + h


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: SD pads right/bottom only, then a stride-2 conv; a symmetric pad=1 keeps the shapes but shifts
        # every latent by half a pixel (kjsman/stable-diffusion-pytorch bug #8).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([Attention(c, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Block(nn.Module):
    """`n` resnets then an optional 2x down- or up-sampler (DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample(c_out)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample(c_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for sampler in [*getattr(self, "downsamplers", []), *getattr(self, "upsamplers", [])]:
            x = sampler(x)
        return x


# ------------------------------------------------------------------------------------------------- encoder and decoder

class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*C_latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            Block(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, H, W)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
            self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior q(z|x) = N(mean, exp(logvar)) in *unscaled* latent units; x in [-1, 1], (B, 3, H, W)."""
        moments = self.encoder(x)
        if self.config.quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)  # (B, C, H/f, W/f) each
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1] -> z = scaling * (mean - shift), the latent the diffusion model works in."""
        mean, _ = self.encode_moments(x)
        return self.config.scaling_factor * (mean - self.config.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode`: a scaled latent z -> image in roughly [-1, 1] (not clamped)."""
        z = z / self.config.scaling_factor + self.config.shift_factor
        if self.config.quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def make_vae(cfg: VAEConfig | str, **overrides) -> AutoencoderKL:
    cfg = VAEConfig.preset(cfg) if isinstance(cfg, str) else cfg
    return AutoencoderKL(replace(cfg, **overrides))
