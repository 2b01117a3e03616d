"""The FLUX transformer, loaded strictly from a BFL single file (flux1-dev.safetensors, also ComfyUI's prefixed
layout) or a diffusers transformer / pipeline folder. Whole FLUX pipeline folders: pipeline.load.

The FLUX transformer is named after BFL's keys (flux.py); diffusers' FluxTransformer2DModel splits fused projections
(q/k/v, and q/k/v + MLP-in in the single blocks) and stores the final modulation as (scale, shift). Rules, then two
fixes: the parts are fused, the final halves swapped. The core (reading, strict checks, meta-build): weights.py.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import torch

from flux import Flux, FluxConfig
from weights import WeightsError, build_and_load, read_config, read_safetensors, rename, strip_prefix

FLUX_DIFFUSERS_RULES = [
    (r"^x_embedder\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^time_text_embed\.timestep_embedder\.", "time_in."),
    (r"^time_text_embed\.guidance_embedder\.", "guidance_in."),
    (r"^time_text_embed\.text_embedder\.", "vector_in."),
    (r"^(time_in|guidance_in|vector_in)\.linear_1\.", r"\1.in_layer."),
    (r"^(time_in|guidance_in|vector_in)\.linear_2\.", r"\1.out_layer."),
    (r"^transformer_blocks\.", "double_blocks."),
    (r"^single_transformer_blocks\.", "single_blocks."),
    # double-stream blocks: diffusers' "context" stream is BFL's txt stream
    (r"^(double_blocks\.\d+)\.norm1\.linear\.", r"\1.img_mod.lin."),
    (r"^(double_blocks\.\d+)\.norm1_context\.linear\.", r"\1.txt_mod.lin."),
    (r"^(double_blocks\.\d+)\.attn\.to_([qkv])\.", r"\1.img_attn.qkv.\2."),  # parts, fused below
    (r"^(double_blocks\.\d+)\.attn\.add_([qkv])_proj\.", r"\1.txt_attn.qkv.\2."),
    (r"^(double_blocks\.\d+)\.attn\.norm_q\.weight$", r"\1.img_attn.norm.query_norm.scale"),
    (r"^(double_blocks\.\d+)\.attn\.norm_k\.weight$", r"\1.img_attn.norm.key_norm.scale"),
    (r"^(double_blocks\.\d+)\.attn\.norm_added_q\.weight$", r"\1.txt_attn.norm.query_norm.scale"),
    (r"^(double_blocks\.\d+)\.attn\.norm_added_k\.weight$", r"\1.txt_attn.norm.key_norm.scale"),
    (r"^(double_blocks\.\d+)\.attn\.to_out\.0\.", r"\1.img_attn.proj."),
    (r"^(double_blocks\.\d+)\.attn\.to_add_out\.", r"\1.txt_attn.proj."),
    (r"^(double_blocks\.\d+)\.ff\.net\.0\.proj\.", r"\1.img_mlp.0."),
    (r"^(double_blocks\.\d+)\.ff\.net\.2\.", r"\1.img_mlp.2."),
    (r"^(double_blocks\.\d+)\.ff_context\.net\.0\.proj\.", r"\1.txt_mlp.0."),
    (r"^(double_blocks\.\d+)\.ff_context\.net\.2\.", r"\1.txt_mlp.2."),
    # single-stream blocks: linear1 = [q; k; v; mlp-in], linear2 = proj_out
    (r"^(single_blocks\.\d+)\.norm\.linear\.", r"\1.modulation.lin."),
    (r"^(single_blocks\.\d+)\.attn\.to_([qkv])\.", r"\1.linear1.\2."),
    (r"^(single_blocks\.\d+)\.proj_mlp\.", r"\1.linear1.mlp."),
    (r"^(single_blocks\.\d+)\.attn\.norm_q\.weight$", r"\1.norm.query_norm.scale"),
    (r"^(single_blocks\.\d+)\.attn\.norm_k\.weight$", r"\1.norm.key_norm.scale"),
    (r"^(single_blocks\.\d+)\.proj_out\.", r"\1.linear2."),
    (r"^norm_out\.linear\.", "final_layer.adaLN_modulation.1."),  # halves swapped below
    (r"^proj_out\.", "final_layer.linear."),
]
_FLUX_PART = re.compile(r"^(.+\.(?:qkv|linear1))\.(q|k|v|mlp)\.(weight|bias)$")


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def flux_diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL names: rename, fuse q|k|v(|mlp) parts, swap final halves."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in rename(sd, FLUX_DIFFUSERS_RULES).items():
        m = _FLUX_PART.match(k)
        if m:
            parts.setdefault(f"{m[1]}.{m[3]}", {})[m[2]] = v
        else:
            out[k] = v
    for k, p in parts.items():
        order = ["q", "k", "v"] + (["mlp"] if ".linear1." in k else [])
        if sorted(p) != sorted(order):
            raise WeightsError(f"FLUX transformer: {k} needs parts {order}, the checkpoint has {sorted(p)}")
        out[k] = torch.cat([p[n] for n in order], dim=0)
    for k in ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"):
        if k in out:
            out[k] = _swap_halves(out[k])  # diffusers (scale, shift) -> BFL (shift, scale)
    return out


def flux_config_from_diffusers(cfg: Mapping) -> FluxConfig:
    """FluxTransformer2DModel config.json -> FluxConfig (missing entries take diffusers' class defaults)."""
    if cfg.get("patch_size", 1) != 1:
        raise WeightsError(f"FLUX transformer: patch_size {cfg['patch_size']} is not supported (FLUX.1 uses 1)")
    heads, head_dim = cfg.get("num_attention_heads", 24), cfg.get("attention_head_dim", 128)
    in_channels = cfg.get("in_channels", 64)
    try:
        return FluxConfig(in_channels=in_channels, out_channels=cfg.get("out_channels") or in_channels,
                          vec_in_dim=cfg.get("pooled_projection_dim", 768),
                          context_in_dim=cfg.get("joint_attention_dim", 4096), hidden_size=heads * head_dim,
                          num_heads=heads, depth=cfg.get("num_layers", 19),
                          depth_single_blocks=cfg.get("num_single_layers", 38),
                          axes_dim=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
                          guidance_embed=bool(cfg.get("guidance_embeds", False)))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"FLUX transformer config: {e}") from None


def load_flux(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              axes_dim: tuple[int, ...] | None = None) -> Flux:
    """The FLUX transformer from a BFL single file (flux1-dev.safetensors; config inferred from the keys), a diffusers
    transformer folder (config.json + sharded safetensors), or a diffusers pipeline folder (its transformer/)."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):
            path = os.path.join(path, "transformer")
        config = flux_config_from_diffusers(read_config(path))
        sd = flux_diffusers_to_bfl(read_safetensors(path))
    else:
        sd = read_safetensors(path)
        if any(k.startswith("model.diffusion_model.") for k in sd):  # ComfyUI-style prefix
            sd = strip_prefix(sd, "model.diffusion_model.")
        if "x_embedder.weight" in sd:  # a diffusers transformer saved as one file
            sd = flux_diffusers_to_bfl(sd)
        try:
            config = FluxConfig.from_bfl_keys(sd, axes_dim=axes_dim)
        except ValueError as e:
            raise WeightsError(f"{path}: {e}") from None
    return build_and_load(lambda: Flux(config), sd, f"FLUX transformer {path}", dtype=dtype, device=device)
