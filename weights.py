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
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from flux import Flux, FluxConfig


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
# Our U-Net and VAE carry diffusers' names. An SD1.5 single file (LDM layout) holds the U-Net under
# `model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text encoder under
# `cond_stage_model.transformer.`; BFL's FLUX `ae.safetensors` is the same LDM VAE layout with no prefix.


def ldm_unet_rules(layers_per_block: int) -> list[tuple[str, object]]:
    """LDM U-Net keys -> diffusers keys. LDM numbers its blocks flat: input_blocks.n with n = 1 + i*(L+1) + j
    (resnet j of level i at .0, its transformer at .1, the level's downsampler at n = (i+1)*(L+1), .0.op), and
    output_blocks.n with n = i*(L+1) + j (upsampler after the last resnet, at .1 or .2 depending on attention)."""
    L1 = layers_per_block + 1

    def down(m):
        i, j = divmod(int(m[1]) - 1, L1)
        return f"down_blocks.{i}.{'resnets' if m[2] == '0' else 'attentions'}.{j}."

    def up(m):
        i, j = divmod(int(m[1]), L1)
        return f"up_blocks.{i}.{'resnets' if m[2] == '0' else 'attentions'}.{j}."

    return [
        (r"^time_embed\.0\.", "time_embedding.linear_1."),
        (r"^time_embed\.2\.", "time_embedding.linear_2."),
        (r"^input_blocks\.0\.0\.", "conv_in."),
        (r"^out\.0\.", "conv_norm_out."),
        (r"^out\.2\.", "conv_out."),
        (r"^input_blocks\.(\d+)\.0\.op\.", lambda m: f"down_blocks.{(int(m[1]) - 1) // L1}.downsamplers.0.conv."),
        (r"^input_blocks\.(\d+)\.([01])\.", down),
        (r"^middle_block\.0\.", "mid_block.resnets.0."),
        (r"^middle_block\.1\.", "mid_block.attentions.0."),
        (r"^middle_block\.2\.", "mid_block.resnets.1."),
        (r"^output_blocks\.(\d+)\.[12]\.conv\.", lambda m: f"up_blocks.{int(m[1]) // L1}.upsamplers.0.conv."),
        (r"^output_blocks\.(\d+)\.([01])\.", up),
        # inside a ResNet block
        (r"\.in_layers\.0\.", ".norm1."), (r"\.in_layers\.2\.", ".conv1."), (r"\.emb_layers\.1\.", ".time_emb_proj."),
        (r"\.out_layers\.0\.", ".norm2."), (r"\.out_layers\.3\.", ".conv2."), (r"\.skip_connection\.", ".conv_shortcut."),
    ]


def ldm_vae_rules(n_levels: int) -> list[tuple[str, object]]:
    """LDM VAE keys -> diffusers keys (the decoder's `up.k` counts from the bottom: up_blocks.{n-1-k}); also renames
    both old attention spellings (q/k/v/proj_out and query/key/value/proj_attn) found in LDM and old diffusers files."""
    return [
        (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
        (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
        (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
        (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.resnets.{m[2]}."),
        (r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m[1])}.upsamplers.0."),
        (r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}."),
        (r"\.mid\.attn_1\.", ".mid_block.attentions.0."),
        (r"\.nin_shortcut\.", ".conv_shortcut."),
        (r"(attentions\.0)\.norm\.", r"\1.group_norm."),
        (r"(attentions\.0)\.(?:q|query)\.", r"\1.to_q."),
        (r"(attentions\.0)\.(?:k|key)\.", r"\1.to_k."),
        (r"(attentions\.0)\.(?:v|value)\.", r"\1.to_v."),
        (r"(attentions\.0)\.(?:proj_out|proj_attn)\.", r"\1.to_out.0."),
    ]


def _model_file_folder(folder: str) -> dict[str, torch.Tensor]:
    """A diffusers model folder's weights: the index (sharded) or diffusion_pytorch_model.safetensors, ignoring
    precision variants (*.fp16.safetensors) next to it."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.isfile(os.path.join(folder, name)) and not any(
                f.endswith(".safetensors.index.json") for f in os.listdir(folder)):
            return read_safetensors(os.path.join(folder, name))
    return read_safetensors(folder)


def _sub(path: str, name: str) -> str:
    """`path` itself, or its `name/` subfolder when `path` is a whole pipeline folder."""
    return os.path.join(path, name) if os.path.isdir(os.path.join(path, name)) else path


def load_unet(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              config=None):
    """SD U-Net from a diffusers folder (unet/ or a pipeline folder) or an LDM single file (`config`: a UNetConfig,
    default the sd15 preset)."""
    from unet import UNet, UNetConfig
    if os.path.isdir(path):
        path = _sub(path, "unet")
        cfg = UNetConfig.from_diffusers(read_config(path))
        sd = _model_file_folder(path)
    else:
        cfg = config or UNetConfig.preset("sd15")
        full = read_safetensors(path)
        sd = strip_prefix(full, "model.diffusion_model.")
        if not sd:
            raise WeightsError(f"{path}: not an SD checkpoint: no U-Net keys (model.diffusion_model.*) among "
                               f"{_listing(sorted(full))}")
        sd = rename(sd, ldm_unet_rules(cfg.layers_per_block))
    return build_and_load(lambda: UNet(cfg), sd, f"U-Net {path}", dtype, device)


def _squeeze_attention(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM VAE attention projections are 1x1 convs (C, C, 1, 1); ours are Linear (C, C)."""
    pattern = re.compile(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")
    return {k: (v[:, :, 0, 0] if pattern.search(k) and v.ndim == 4 else v) for k, v in sd.items()}


def vae_config_from_keys(sd: Mapping[str, torch.Tensor], norm_num_groups: int = 32):
    """VAEConfig read off LDM-layout VAE keys. The layout follows from the keys: quant convs -> SD (0.18215), none ->
    FLUX (0.3611, shift 0.1159). NOTE: GroupNorm group counts are not visible in the weights; 32 as in SD and FLUX."""
    from vae import VAEConfig
    try:
        n = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
        channels = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n))
        layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
        latent = sd["decoder.conv_in.weight"].shape[1]
    except (ValueError, KeyError) as e:
        raise WeightsError(f"not an LDM-layout VAE (missing {e})") from None
    quant = "quant_conv.weight" in sd
    layout = dict(scaling_factor=0.18215, shift_factor=0.0) if quant else \
        dict(scaling_factor=0.3611, shift_factor=0.1159)
    return VAEConfig(latent_channels=latent, block_out_channels=channels, layers_per_block=layers,
                     norm_num_groups=norm_num_groups, quant_conv=quant, **layout)


def load_vae(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None, config=None):
    """AutoencoderKL from a diffusers folder (vae/ or a pipeline folder; SD or FLUX), an SD1.5 single file
    (`first_stage_model.*`), or BFL's FLUX `ae.safetensors` (LDM keys, no prefix). `config` overrides the VAEConfig
    read off a single file's keys."""
    from vae import AutoencoderKL, VAEConfig
    if os.path.isdir(path):
        path = _sub(path, "vae")
        cfg = VAEConfig.from_diffusers(read_config(path))
        sd = _model_file_folder(path)
    else:
        full = read_safetensors(path)
        sd = strip_prefix(full, "first_stage_model.") or full
        if not any(k.startswith(("encoder.", "decoder.")) for k in sd):
            raise WeightsError(f"{path}: not a VAE checkpoint: no encoder./decoder. keys (or first_stage_model.*) "
                               f"among {_listing(sorted(full))}")
        if not any(".down_blocks." in k for k in sd):  # LDM layout: read the config off the keys
            cfg = config or vae_config_from_keys(sd)
        elif config is None:
            raise WeightsError(f"{path}: a diffusers-layout VAE file needs its config (pass a VAEConfig)")
        else:
            cfg = config
    sd = _squeeze_attention(rename(sd, ldm_vae_rules(len(cfg.block_out_channels))))
    return build_and_load(lambda: AutoencoderKL(cfg), sd, f"VAE {path}", dtype, device)


def clip_text_config_from_keys(sd: Mapping[str, torch.Tensor]):
    """CLIPTextConfig read off a text encoder's keys. NOTE: heads are not visible in the weights; head dim 64, as in
    CLIP ViT-L/14 (SD1.5) and OpenCLIP ViT-H/14."""
    from transformers import CLIPTextConfig
    try:
        vocab, hidden = sd["text_model.embeddings.token_embedding.weight"].shape
        positions = sd["text_model.embeddings.position_embedding.weight"].shape[0]
        intermediate = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"not a CLIP text encoder (missing {e})") from None
    layers = 1 + max(int(m[1]) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          max_position_embeddings=positions, hidden_act="quick_gelu", projection_dim=hidden,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1)  # CLIP's vocabulary ends with these two


def load_text_encoder(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """transformers CLIPTextModel from a folder (text_encoder/ or a pipeline folder: config.json + model.safetensors)
    or an SD1.5 single file (`cond_stage_model.transformer.*`, config read off the keys)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    if os.path.isdir(path):
        path = _sub(path, "text_encoder")
        config = CLIPTextConfig.from_pretrained(path)
        sd = _model_file_folder(path)
    else:
        full = read_safetensors(path)
        sd = strip_prefix(full, "cond_stage_model.transformer.")
        if not sd:
            raise WeightsError(f"{path}: not an SD checkpoint: no text encoder keys (cond_stage_model.transformer.*)")
        config = clip_text_config_from_keys(rename(sd, [(r"^(?!text_model\.)", "text_model.")]))
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # a constant, stored by old transformers
    return _build_clip(CLIPTextModel, config, sd, f"text encoder {path}", dtype, device)


def _build_clip(cls, config, sd, what, dtype, device):
    """build_and_load for transformers models, whose `position_ids` buffer is a non-persistent constant."""
    with torch.device("meta"):
        model = cls(config)
    # NOTE: files say `text_model.embeddings...`; transformers 5 names the same tensors without `text_model.`
    prefixed = any(k.startswith("text_model.") for k in model.state_dict())
    sd = rename(sd, [(r"^(?!text_model\.)", "text_model.")] if prefixed else [(r"^text_model\.", "")])
    check_state_dict(model, sd, what)
    dtype = dtype or torch.float32
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name.endswith("position_ids"):
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.position_ids = torch.arange(buf.shape[-1], device=device).expand(1, -1)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left, f"{what}: tensors left on meta after loading: {left[:5]}"
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str):
    """CLIPTokenizer from a tokenizer folder (vocab.json + merges.txt) or a pipeline folder's tokenizer/."""
    from transformers import CLIPTokenizer
    path = _sub(path, "tokenizer")
    if not (os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt"))):
        raise WeightsError(f"{path}: not a CLIP tokenizer folder (needs vocab.json and merges.txt)")
    return CLIPTokenizer.from_pretrained(path)


@dataclass
class SDPipeline:
    """A whole SD1.x model: U-Net, VAE, CLIP text encoder + tokenizer, and the scheduler settings (a dict in
    diffusers' scheduler_config.json vocabulary; see sampler.VPSchedule.from_config)."""
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    scheduler: dict

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> context (B, 77, D): CLIP's last hidden state, prompts padded to 77 tokens; longer ones are
        truncated with a warning (as diffusers does)."""
        max_length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        for p, n in zip(prompts, (len(i) for i in self.tokenizer(prompts).input_ids)):
            if n > max_length:
                warnings.warn(f"prompt truncated to {max_length} tokens (it has {n}): {p[:60]!r}...", stacklevel=2)
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(ids.to(device))[0]  # (B, 77, D)


def load_sd(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
            tokenizer: str | None = None, config=None, vae_config=None) -> SDPipeline:
    """A whole SD1.x pipeline: a diffusers folder (model_index.json with unet/ vae/ text_encoder/ tokenizer/
    scheduler/) or an LDM single file plus a `tokenizer` folder (`config`: its UNetConfig, default sd15;
    `vae_config`: its VAEConfig, default read off the keys)."""
    from sampler import SD15_SCHEDULER
    if not os.path.exists(path):
        raise WeightsError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        index = read_config(path, "model_index.json")
        subs = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(path, s))]
        if subs:
            raise WeightsError(f"{path} is not a diffusers SD folder ({index.get('_class_name')}): no {subs}")
        sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
        scheduler = read_config(os.path.dirname(sched_file), "scheduler_config.json") if os.path.isfile(sched_file) \
            else dict(SD15_SCHEDULER)
        return SDPipeline(load_unet(os.path.join(path, "unet"), dtype, device),
                          load_vae(os.path.join(path, "vae"), dtype, device),
                          load_text_encoder(os.path.join(path, "text_encoder"), dtype, device),
                          load_tokenizer(os.path.join(path, "tokenizer")), scheduler)
    if tokenizer is None:
        raise WeightsError(f"{path}: a single-file checkpoint needs a CLIP tokenizer folder (vocab.json, merges.txt)")
    return SDPipeline(load_unet(path, dtype, device, config), load_vae(path, dtype, device, vae_config),
                      load_text_encoder(path, dtype, device), load_tokenizer(tokenizer), dict(SD15_SCHEDULER))


# ---------------------------------------------------------------------------------------------------------------- FLUX

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
                       max_length: int = 512, transformer: str | None = None) -> FluxPipe:
    """A diffusers FLUX folder: transformer/, vae/, text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ +
    tokenizer_2/ (T5-XXL), scheduler/. The VAE may have 16 (FLUX) or 4 (SD layout, toy folders) latent channels.
    `transformer`: a single file (BFL flux1-dev.safetensors) used instead of the folder's transformer/."""
    from transformers import AutoTokenizer
    if not os.path.isdir(folder):
        raise WeightsError(f"no such FLUX pipeline folder: {folder}")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if not os.path.isdir(os.path.join(folder, sub)) and not (sub == "transformer" and transformer):
            raise WeightsError(f"{folder} is not a diffusers FLUX folder: no {sub}/")
    model = load_flux(transformer or os.path.join(folder, "transformer"), dtype=dtype, device=device)
    sched = os.path.join(folder, "scheduler", "scheduler_config.json")
    shift = model.config.guidance_embed
    if os.path.isfile(sched):
        with open(sched) as f:
            shift = bool(json.load(f).get("use_dynamic_shifting", shift))
    return FluxPipe(
        transformer=model, vae=load_vae(os.path.join(folder, "vae"), dtype=dtype, device=device),
        clip=_load_text_encoder(os.path.join(folder, "text_encoder"), dtype, device),
        clip_tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        t5=_load_text_encoder(os.path.join(folder, "text_encoder_2"), dtype, device),
        t5_tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")),
        shift=shift, max_length=max_length)
