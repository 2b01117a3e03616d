"""Checkpoint loading: every format users actually have, loaded strictly.

Our modules are named after the checkpoint keys (diffusers names for SD1.5, BFL names for FLUX), so loading is a
direct `load_state_dict(strict=True)`; other layouts are converted by a few *rules* (regexes), never a table.
Large models are built on the `meta` device and the loaded tensors are assigned, so loading never holds two copies.

Sections:
  # ---- core        reading safetensors files / sharded folders, strict key checks, meta-build-and-assign
  # ---- SD1.5       U-Net, VAE, text encoder, whole pipelines (diffusers folders and LDM single files)
  # ---- FLUX        transformer (BFL single file, diffusers folder), FLUX VAE, CLIP-L + T5 text encoders
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: missing path, unreadable file, wrong keys or shapes."""


# ---------------------------------------------------------------------------------------------------------------- core

def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read one `.safetensors` file, or a folder of shards with a `*.safetensors.index.json` (or a single file in it)."""
    if not os.path.exists(path):
        raise WeightsError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        index = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(path, index[0])) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for shard in shards:
                sd.update(read_safetensors(os.path.join(path, shard)))
            return sd
        files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
        if len(files) != 1:
            raise WeightsError(f"expected one .safetensors file or an index file in {path}, found {files or 'none'}")
        return read_safetensors(os.path.join(path, files[0]))
    if not path.endswith(".safetensors"):
        raise WeightsError(f"{path}: only .safetensors checkpoints are read (pickled .ckpt/.bin files are unsafe)")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def read_config(folder: str, name: str = "config.json") -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise WeightsError(f"no {name} in {folder}")
    with open(path) as f:
        return json.load(f)


def _listing(names: list[str], n: int = 5) -> str:
    head = ", ".join(names[:n])
    return f"{len(names)} ({head}{', ...' if len(names) > n else ''})"


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one WeightsError listing missing, unexpected and mis-shaped keys (first few of each, with counts)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(sd) if tuple(expected[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {_listing(unexpected)}")
        if misshaped:
            shown = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}" for k in misshaped]
            parts.append(f"mis-shaped {_listing(shown, 3)}")
        raise WeightsError(f"{what}: checkpoint does not match the model: " + "; ".join(parts))


def build_and_load(make: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], what: str,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Build `make()` on the meta device, check `sd` strictly, assign its tensors, return the model in eval mode.

    Tensors are cast to `dtype` (default: float32 for floating tensors) and moved to `device` one at a time, so peak
    memory is one copy of the checkpoint. Buffers that are not in the state dict must not exist: modules compute such
    constants (RoPE frequencies, sinusoidal tables) on the fly.
    """
    with torch.device("meta"):
        model = make()
    check_state_dict(model, sd, what)
    dtype = dtype or torch.float32
    cast = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
            for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"{what}: tensors left on meta after loading: {left[:5]}"
    return model.eval().requires_grad_(False)


def rename(sd: Mapping[str, torch.Tensor], rules: Iterable[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regex rules (pattern, replacement) in order to every key; a key matching no rule is kept as is."""
    import re
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in sd.items():
        for p, r in compiled:
            k = p.sub(r, k)
        out[k] = v
    return out


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The sub-state-dict under `prefix` (e.g. 'model.diffusion_model.'), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------------------------------- SD1.5


# ---------------------------------------------------------------------------------------------------------------- FLUX
import re  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from flux import Flux, FluxConfig  # noqa: E402

# The FLUX transformer is named after BFL's keys; diffusers' FluxTransformer2DModel splits fused projections (q/k/v,
# and q/k/v + MLP-in in the single blocks) and stores the final modulation as (scale, shift). Rules, then two fixes.

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
    except ValueError as e:
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


def _load_text_encoder(folder: str, dtype: torch.dtype | None, device) -> nn.Module:
    """CLIPTextModel or T5EncoderModel, chosen by the folder's config.json model_type; strict (no fresh weights)."""
    import transformers
    classes = {"clip_text_model": transformers.CLIPTextModel, "t5": transformers.T5EncoderModel}
    model_type = read_config(folder).get("model_type")
    if model_type not in classes:
        raise WeightsError(f"{folder}: text encoder model_type {model_type!r} is not one of {sorted(classes)}")
    model, info = classes[model_type].from_pretrained(folder, dtype=dtype or torch.float32, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if "position_ids" not in k]
    if missing or info.get("mismatched_keys"):
        raise WeightsError(f"{folder}: text encoder weights do not match: missing {_listing(sorted(missing))}, "
                           f"mis-shaped {_listing([str(m) for m in info.get('mismatched_keys', [])])}")
    return model.to(device).eval().requires_grad_(False)


@dataclass
class FluxPipe:
    """A whole FLUX model from a diffusers folder: transformer, VAE, CLIP-L (pooled y) and T5 (txt), tokenizers."""
    transformer: Flux
    vae: nn.Module
    clip: nn.Module
    clip_tokenizer: object
    t5: nn.Module  # T5EncoderModel (or a small CLIPTextModel standing in for it in toy folders)
    t5_tokenizer: object
    shift: bool  # dynamic schedule shift (dev) or plain linspace (schnell), from scheduler_config.json
    max_length: int = 512  # T5 tokens

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (txt (B, L, context_in_dim) T5 last hidden state, y (B, vec_in_dim) CLIP pooled output)."""
        device = next(self.clip.parameters()).device
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        y = self.clip(ids.to(device)).pooler_output
        # a CLIP standing in for T5 has learned positions: never ask for more tokens than it has
        max_length = min(self.max_length, getattr(self.t5.config, "max_position_embeddings", self.max_length))
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt").input_ids
        txt = self.t5(ids.to(next(self.t5.parameters()).device)).last_hidden_state
        return txt, y


def load_flux_pipeline(folder: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                       max_length: int = 512) -> FluxPipe:
    """A diffusers FLUX folder: transformer/, vae/, text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ +
    tokenizer_2/ (T5-XXL), scheduler/. The VAE may have 16 (FLUX) or 4 (SD layout, toy folders) latent channels."""
    from transformers import AutoTokenizer
    if not os.path.isdir(folder):
        raise WeightsError(f"no such FLUX pipeline folder: {folder}")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise WeightsError(f"{folder} is not a diffusers FLUX folder: no {sub}/")
    transformer = load_flux(os.path.join(folder, "transformer"), dtype=dtype, device=device)
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    shift = transformer.config.guidance_embed
    if os.path.isfile(sched):
        with open(sched) as f:
            shift = bool(json.load(f).get("use_dynamic_shifting", shift))
    return FluxPipe(
        transformer=transformer, vae=load_vae(os.path.join(folder, "vae"), dtype=dtype, device=device),
        clip=_load_text_encoder(os.path.join(folder, "text_encoder"), dtype, device),
        clip_tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        t5=_load_text_encoder(os.path.join(folder, "text_encoder_2"), dtype, device),
        t5_tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")),
        shift=shift, max_length=max_length)
