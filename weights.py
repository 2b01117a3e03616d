"""Checkpoint loading: every format users actually have, loaded strictly.

Our modules are named after the checkpoint keys (diffusers names for SD1.5, BFL names for FLUX), so loading is a
direct `load_state_dict(strict=True)`; other layouts are converted by a few *rules* (regexes), never a table.
Large models are built on the `meta` device and the loaded tensors are assigned, so loading never holds two copies.

Sections:
  # ---- core        reading safetensors / torch files and configs, strict key checks, meta-build-and-assign
  # ---- SD1.5       U-Net and VAE (diffusers folders and LDM single files)
  # ---- text        CLIP / T5 text encoders and tokenizers (either tokenizer layout)
  # ---- pipelines   a whole SD1.x pipeline
FLUX's transformer and pipeline folders: weights_flux.py.
"""
from __future__ import annotations

import json
import os
import re
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
    """A JSON object from FOLDER/NAME; a missing, unreadable, non-UTF-8 or non-object file is one WeightsError."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise WeightsError(f"no {name} in {folder}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable JSON file: {e}") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def torch_load(path: str) -> dict:
    """A torch checkpoint of tensors and containers only (weights_only: no code is unpickled), on the CPU."""
    if not os.path.isfile(path):
        raise WeightsError(f"no such file: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors have many types; all mean the same thing to the user
        raise WeightsError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from None


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


# Constant, non-persistent buffers of transformers models, rebuilt after loading (never read from a file).
CONSTANT_BUFFERS = {"position_ids": lambda shape, device: torch.arange(shape[-1], device=device).expand(shape),
                    "token_type_ids": lambda shape, device: torch.zeros(shape, dtype=torch.long, device=device)}


def build_and_load(make: Callable[[], nn.Module], sd: Mapping[str, torch.Tensor], what: str,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> nn.Module:
    """Build `make()` on the meta device, check `sd` strictly, assign its tensors, return the model in eval mode.

    The one loader behind every model here (ours, transformers' CLIP / T5 / BLIP). Tensors are cast to `dtype`
    (default: float32 for floating tensors) and moved to `device` one at a time, so peak memory is one copy of the
    checkpoint. Tied parameters (T5's shared embedding) are filled from whichever name the file holds; constant
    buffers (CONSTANT_BUFFERS) are rebuilt, and old files that still store them are accepted. Any other buffer must
    be in the file: our modules compute such constants (RoPE frequencies, sinusoidal tables) on the fly.
    """
    with torch.device("meta"):
        model = make()
    constant = {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1] in CONSTANT_BUFFERS}
    sd = {k: v for k, v in sd.items() if k not in constant}
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for names in (n for n in aliases.values() if len(n) > 1):
        held = [n for n in names if n in sd]
        if held:
            sd.update({n: sd[held[0]] for n in names if n not in sd})
    check_state_dict(model, sd, what)
    dtype = dtype or torch.float32
    cast = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device=device))
            for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and name in constant:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, CONSTANT_BUFFERS[attr](buf.shape, device))
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


def read_model_folder(folder: str) -> dict[str, torch.Tensor]:
    """A model folder's weights: the index (sharded), diffusion_pytorch_model / model.safetensors (precision variants
    such as *.fp16.safetensors beside it are ignored), or a lone pytorch_model.bin (read with weights_only)."""
    files = os.listdir(folder)
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if name in files and not any(f.endswith(".safetensors.index.json") for f in files):
            return read_safetensors(os.path.join(folder, name))
    if "pytorch_model.bin" in files and not any(f.endswith(".safetensors") for f in files):
        return torch_load(os.path.join(folder, "pytorch_model.bin"))
    return read_safetensors(folder)


def model_config(parse: Callable[[dict], object], cfg: dict, folder: str, need=("block_out_channels",)):
    """A model config from a config.json dict; a missing size (`need`) or settings that describe no model (0 heads,
    widths that do not divide) are one WeightsError naming the file, not a default or a traceback."""
    path = os.path.join(folder, "config.json")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise WeightsError(f"{path}: missing {', '.join(missing)}")
    try:
        return parse(cfg)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        raise WeightsError(f"{path}: {e}") from None


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
        cfg = model_config(UNetConfig.from_diffusers, read_config(path), path)
        sd = read_model_folder(path)
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
        cfg = model_config(VAEConfig.from_diffusers, read_config(path), path)
        sd = read_model_folder(path)
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


# --------------------------------------------------------------------------------------------------------------- text
# Text encoders are transformers models (CLIPTextModel; T5EncoderModel for FLUX), loaded strictly by build_and_load.

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


def transformers_config(cls, cfg: dict, path: str):
    """A transformers config object from a config.json dict; nonsense (0 heads, a width not divisible by the heads,
    a missing size) is one WeightsError naming the file."""
    try:
        config = cls.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: not a valid {cls.__name__}: {e}") from None
    heads = getattr(config, "num_attention_heads", getattr(config, "num_heads", 1))
    width = getattr(config, "hidden_size", getattr(config, "d_model", 1))
    if not (isinstance(heads, int) and isinstance(width, int) and heads > 0 and width > 0 and
            (cls.__name__.startswith("T5") or width % heads == 0)):
        raise WeightsError(f"{path}: {cls.__name__} with {heads} heads and width {width} is not a model")
    return config


def load_text_encoder(path: str, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """A frozen text encoder: a folder with config.json (model_type clip_text_model -> CLIPTextModel, t5 ->
    T5EncoderModel) and safetensors weights (text_encoder/ or a pipeline folder), or an SD1.5 single file
    (`cond_stage_model.transformer.*`, config read off the keys). Strict: a missing config, a missing or mis-shaped
    tensor is one WeightsError."""
    import transformers
    classes = {"clip_text_model": (transformers.CLIPTextModel, transformers.CLIPTextConfig),
               "t5": (transformers.T5EncoderModel, transformers.T5Config)}
    if os.path.isdir(path):
        path = _sub(path, "text_encoder")
        cfg = read_config(path)
        if cfg.get("model_type") not in classes:
            raise WeightsError(f"{path}: text encoder model_type {cfg.get('model_type')!r} is not one of "
                               f"{sorted(classes)}")
        cls, config_cls = classes[cfg["model_type"]]
        config = transformers_config(config_cls, cfg, os.path.join(path, "config.json"))
        sd = read_model_folder(path)
    else:
        full = read_safetensors(path)
        sd = strip_prefix(full, "cond_stage_model.transformer.")
        if not sd:
            raise WeightsError(f"{path}: not an SD checkpoint: no text encoder keys (cond_stage_model.transformer.*)")
        cls, config = transformers.CLIPTextModel, clip_text_config_from_keys(rename(sd, [(r"^(?!text_model\.)",
                                                                                          "text_model.")]))
    if cls is transformers.CLIPTextModel:
        # NOTE: files say `text_model.embeddings...`; transformers 5 names the same tensors without `text_model.`
        with torch.device("meta"):
            prefixed = any(k.startswith("text_model.") for k in cls(config).state_dict())
        sd = rename(sd, [(r"^(?!text_model\.)", "text_model.")] if prefixed else [(r"^text_model\.", "")])
    return build_and_load(lambda: cls(config), sd, f"text encoder {path}", dtype, device)


# Tokenizer files by kind: either layout of a CLIP tokenizer (current transformers' `save_pretrained` writes only
# tokenizer.json + tokenizer_config.json; older folders have vocab.json + merges.txt), T5's, BERT's.
TOKENIZER_FILES = {"clip": (("tokenizer.json",), ("vocab.json", "merges.txt")),
                   "t5": (("tokenizer.json",), ("spiece.model",)),
                   "bert": (("tokenizer.json",), ("vocab.txt",))}


def find_tokenizer(*paths: str | None, kind: str = "clip") -> str | None:
    """The first of `paths` (or its `tokenizer/` sub-folder) that holds a tokenizer of `kind`, else None."""
    for path in paths:
        for folder in filter(None, (path, path and os.path.join(path, "tokenizer"))):
            if any(all(os.path.isfile(os.path.join(folder, f)) for f in files) for files in TOKENIZER_FILES[kind]):
                return folder
    return None


def load_tokenizer(*paths: str | None, kind: str = "clip"):
    """The tokenizer in the first of `paths` that has one (see find_tokenizer): CLIPTokenizer, the class a T5 folder
    names, or BertTokenizer. Either file layout works."""
    from transformers import AutoTokenizer, BertTokenizer, CLIPTokenizer
    folder = find_tokenizer(*paths, kind=kind)
    if folder is None:
        need = " or ".join(" + ".join(f) for f in TOKENIZER_FILES[kind])
        tried = ", ".join(p for p in paths if p) or "no folder"
        raise WeightsError(f"no {kind.upper()} tokenizer ({need}) in {tried}")
    cls = {"clip": CLIPTokenizer, "t5": AutoTokenizer, "bert": BertTokenizer}[kind]
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: not a readable {kind.upper()} tokenizer: {e}") from None
