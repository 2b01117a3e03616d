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
