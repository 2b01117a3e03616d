"""Reward models behind one contract: `reward(images, prompts) -> (B,)` scores, higher is better.

`images` are (B, 3, H, W) in [0, 1] at any size (CLIP rewards resize them inside), `prompts` a list of B strings.
Every reward is differentiable with respect to the images and frozen (eval mode, no parameter gradients), so L_R can
back-propagate through it into the generator. Real checkpoints are read from local paths, never downloaded, and no
open_clip is needed: HPSv2's open_clip state dict is converted into `transformers`' CLIPModel by a few key rules.

    HPSv2 / v2.1   cos(f_img, f_txt)                       open_clip ViT-H-14 `.pt` + any CLIP tokenizer folder
    PickScore      logit_scale.exp() · cos(f_img, f_txt)  transformers CLIPModel folder
    CLIP score     100 · cos(f_img, f_txt)                CLIP ViT-L/14 folder
    aesthetic      MLP(f_img / |f_img|)                    CLIP ViT-L/14 folder + LAION aesthetic v2 MLP `.pth`
    SRPO relative  f_img · ((1+k) f_txt(p+) − f_txt(p−))   any of the CLIP-style rewards above (seed 002)

Shape alphabet: B batch, H W image size, S CLIP input size (224), L tokens, D feature width.

Sections:
  # ---- contract   Reward base class, WeightedSum, the `--reward` spec parser and its REWARDS table
  # ---- CLIP       differentiable preprocessing, strict CLIPModel / tokenizer loading, CLIPReward
  # ---- HPS        open_clip -> transformers key rules, config inferred from shapes
  # ---- others     aesthetic MLP, SRPO relative reward, constructors used by the spec parser
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from weights import (WeightsError, build_and_load, load_tokenizer, read_config, read_model_folder, rename,
                     torch_load, transformers_config)


# ------------------------------------------------------------------------------------------------------------ contract

class Reward(nn.Module):
    """Base class: `forward(images (B, 3, H, W) in [0, 1], prompts: list[str]) -> (B,)` float32 scores.

    Subclasses hold frozen models: call `self.freeze()` at the end of `__init__`.
    """

    def freeze(self) -> "Reward":
        return self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "Reward":
        # NOTE: a reward is a frozen judge: a parent module's .train() must not switch on its dropout (aesthetic MLP).
        return super().train(False)


def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward: images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"reward: {images.shape[0]} images but {len(prompts)} prompts")


class WeightedSum(Reward):
    """total = Σ_i w_i · r_i(images, prompts); `forward_parts` also returns each unweighted r_i for logging."""

    def __init__(self, parts: Mapping[str, tuple[Reward, float]]):
        super().__init__()
        if not parts:
            raise ValueError("WeightedSum needs at least one reward")
        self.rewards = nn.ModuleDict({name: reward for name, (reward, _) in parts.items()})
        self.weights = {name: float(w) for name, (_, w) in parts.items()}

    def forward_parts(self, images: torch.Tensor, prompts: Sequence[str]
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = {name: reward(images, prompts) for name, reward in self.rewards.items()}  # each (B,)
        total = sum(self.weights[name] * s for name, s in scores.items())
        return total, scores

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.forward_parts(images, prompts)[0]


# name -> make(path, *, tokenizer, device, dtype) -> Reward. The table of real rewards is REWARDS at the end of this
# file; config.REWARDS adds the toy world's (toy/rewards.py). Nothing registers itself on import.
RewardMaker = Callable[..., Reward]


def parse_spec(spec: str, registry: Mapping[str, RewardMaker] | None = None, flag: str = "--reward"
               ) -> list[tuple[str, str, float]]:
    """A reward spec "name[:path][=weight],..." -> [(name, path, weight)], checked but nothing loaded: every name
    known (a `rel-` prefix allowed), every weight a finite number, no item or given path empty. The errors name
    `flag`, so that a script can refuse a bad spec before it creates anything."""
    registry = REWARDS if registry is None else registry
    items = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise ValueError(f"{flag} {spec!r}: an empty item")
        weight = 1.0
        if "=" in item:
            item, w = item.rsplit("=", 1)
            try:
                weight = float(w)
            except ValueError:
                raise ValueError(f"{flag} {spec!r}: weight {w!r} is not a number") from None
            if not math.isfinite(weight):
                raise ValueError(f"{flag} {spec!r}: weight {w!r} is not finite")
        name, colon, path = item.partition(":")
        base = name[len("rel-"):] if name.startswith("rel-") else name
        if base not in registry:
            raise ValueError(f"{flag}: unknown reward {name!r} in {spec!r}; known: {', '.join(sorted(registry))} "
                             f"(prefix one with 'rel-' for SRPO's relative reward)")
        if colon and not path:
            raise ValueError(f"{flag} {spec!r}: {name}: names no file after ':' (name:PATH, or a toy reward's name "
                             "alone for its shipped model)")
        items.append((name, path, weight))
    return items


def parse_reward_spec(spec: str, tokenizer: str | None = None, device: str | torch.device | None = None,
                      dtype: torch.dtype | None = None, registry: Mapping[str, RewardMaker] | None = None,
                      flag: str = "--reward") -> WeightedSum:
    """Parse `--reward` specs like "hps:HPS_v2.1.pt,pick:PickScore_v1=0.5,rel-hps:HPS.pt" into a WeightedSum.

    Each comma-separated item is `name[:path][=weight]` (weight 1 by default), `name` a key of `registry` (default:
    REWARDS). A `rel-` prefix wraps the reward in SRPO's RelativeReward with its default control words. `tokenizer` is a CLIP tokenizer folder used by
    rewards whose checkpoint has none (HPS's `.pt`; the SD1.5 pipeline's `tokenizer/` works).
    """
    registry = REWARDS if registry is None else registry
    parts: dict[str, tuple[Reward, float]] = {}
    for name, path, weight in parse_spec(spec, registry, flag):
        base = name[len("rel-"):] if name.startswith("rel-") else name
        try:
            reward = registry[base](path, tokenizer=tokenizer, device=device, dtype=dtype)
        except ValueError as e:
            raise type(e)(f"{flag} {name}: {e}") from None
        if base != name:
            reward = RelativeReward(reward)
        key, n = name.replace(".", "_"), 2
        while key in parts:  # the same reward twice (e.g. two HPS versions): hps, hps_2, ...
            key, n = f"{name.replace('.', '_')}_{n}", n + 1
        parts[key] = (reward, weight)
    return WeightedSum(parts)


# ---------------------------------------------------------------------------------------------------------------- CLIP

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Differentiable CLIP preprocessing: short side to `size` (bicubic, antialias), center crop, OpenAI mean/std.

    (B, 3, H, W) in [0, 1] -> (B, 3, S, S) float32. torch's antialiased bicubic uses PIL's kernel (a = -0.5), so this is
    torchvision's Resize(size, BICUBIC) + CenterCrop(size) + Normalize on a float image.
    NOTE: no clamp to [0, 1] after the bicubic overshoot (PIL clamps when it works in uint8): it would cut gradients.
    """
    B, C, H, W = images.shape
    images = images.float()  # NOTE: antialiased bicubic has no bf16/fp16 CPU kernel; the resize is cheap in fp32
    if (H, W) != (size, size):
        scale = size / min(H, W)
        h, w = max(size, round(H * scale)), max(size, round(W * scale))
        images = F.interpolate(images, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))  # torchvision's CenterCrop rule
        images = images[:, :, top:top + size, left:left + size]  # (B, 3, S, S)
    mean = images.new_tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(OPENAI_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def pooled(out) -> torch.Tensor:
    # NOTE: transformers 5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected features;
    # transformers 4 returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def build_clip(config: CLIPConfig, sd: Mapping[str, torch.Tensor], what: str, device=None, dtype=None) -> CLIPModel:
    """A frozen CLIPModel from a state dict, loaded strictly (weights.build_and_load)."""
    return build_and_load(lambda: CLIPModel(config), sd, what, dtype, device)


def load_clip_model(folder: str, device=None, dtype=None) -> CLIPModel:
    """A transformers CLIPModel folder (config.json + weights), loaded strictly."""
    cfg = read_config(folder)
    if cfg.get("model_type") != "clip":
        raise WeightsError(f"{folder}: config.json has model_type {cfg.get('model_type')!r}, expected 'clip'")
    config = transformers_config(CLIPConfig, cfg, os.path.join(folder, "config.json"))
    return build_clip(config, read_model_folder(folder), f"CLIP model {folder}", device, dtype)


class CLIPReward(Reward):
    """score = scale · cos(f_img, f_txt) on a frozen transformers CLIPModel; scale None means logit_scale.exp()."""

    def __init__(self, model: CLIPModel, tokenizer, scale: float | None):
        super().__init__()
        self.model, self.tokenizer, self.fixed_scale = model, tokenizer, scale
        self.size = model.config.vision_config.image_size  # 224 for every real checkpoint
        self.max_length = model.config.text_config.max_position_embeddings  # 77

    def scale(self) -> torch.Tensor | float:
        return self.model.logit_scale.exp().float() if self.fixed_scale is None else self.fixed_scale

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unit-norm image features (B, D), float32, differentiable."""
        pixels = clip_preprocess(images, self.size).to(self.model.logit_scale.dtype)  # (B, 3, S, S)
        return F.normalize(pooled(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> unit-norm text features (B, D), float32 (no gradient: only the images are optimised)."""
        # NOTE: no attention mask, as open_clip: the text tower is causal and pools at the first EOT token, so the
        # padding after it (EOT for HF tokenizers, 0 for open_clip's) never changes the features.
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt").input_ids.to(self.model.logit_scale.device)  # (B, L)
        return F.normalize(pooled(self.model.get_text_features(input_ids=ids)).float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        return self.scale() * (self.encode_images(images) * self.encode_texts(prompts)).sum(-1)  # (B,)


# ----------------------------------------------------------------------------------------------------------------- HPS

# open_clip -> transformers CLIPModel: renames; `in_proj` is split into q/k/v and the two projections are transposed
# in `hps_to_transformers`.
HPS_RULES = [
    (r"^visual\.proj$", "visual_projection.weight"),
    (r"^text_projection$", "text_projection.weight"),
    (r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
    (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
    (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^ln_final\.", "text_model.final_layer_norm."),
    (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."),
    (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.attn\.in_proj_(weight|bias)$", r".self_attn.in_proj.\1"),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]


def hps_to_transformers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip ViT state dict -> transformers CLIPModel state dict (rules above, then q/k/v split + transposes)."""
    out = {}
    for k, v in rename(sd, HPS_RULES).items():
        if ".self_attn.in_proj." in k:  # nn.MultiheadAttention packs [W_q; W_k; W_v] along dim 0
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[k.replace("in_proj", name)] = part
        elif k in ("visual_projection.weight", "text_projection.weight"):
            out[k] = v.t()  # open_clip computes x @ proj (D_in, D); nn.Linear stores (D, D_in)
        else:
            out[k] = v
    return out


def _layers(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def hps_config(sd: Mapping[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 16,
               hidden_act: str = "gelu") -> CLIPConfig:
    """CLIPConfig of an open_clip ViT state dict, inferred from its shapes (so tiny test models load too).

    NOTE: head counts cannot be read from shapes; the defaults are ViT-H-14's (vision 1280/80, text 1024/64), the
    architecture of HPSv2 and v2.1. open_clip's ViT-H-14 uses exact GELU (OpenAI's own CLIPs use quick_gelu).
    """
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
            "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
            "transformer.resblocks.0.mlp.c_fc.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise WeightsError(f"not an open_clip ViT state dict: missing {', '.join(missing)}")
    D_v, _, P, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    vocab, D_t = sd["token_embedding.weight"].shape
    vision = dict(hidden_size=D_v, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layers(sd, "visual.transformer.resblocks."), num_attention_heads=vision_heads,
                  image_size=grid * P, patch_size=P, hidden_act=hidden_act, layer_norm_eps=1e-5)
    # NOTE: eos_token_id 2 selects transformers' legacy pooling, argmax of the token ids: exactly open_clip's rule.
    text = dict(hidden_size=D_t, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layers(sd, "transformer.resblocks."), num_attention_heads=text_heads,
                max_position_embeddings=sd["positional_embedding"].shape[0], vocab_size=vocab,
                hidden_act=hidden_act, layer_norm_eps=1e-5, eos_token_id=2, bos_token_id=None, pad_token_id=1)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1])


def read_hps_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The open_clip state dict in an HPS `.pt`: a dict with 'state_dict' (HPS releases) or a bare state dict."""
    ckpt = torch_load(path)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: expected a state dict or a dict with 'state_dict', got {type(ckpt).__name__}")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k != "attn_mask"}  # NOTE: the causal mask is a constant, not a weight


def load_hps(path: str, tokenizer: str | None = None, device=None, dtype=None,
             vision_heads: int = 16, text_heads: int = 16, hidden_act: str = "gelu") -> CLIPReward:
    """HPSv2 / v2.1 (Wu et al. 2023): score = cos(f_img, f_txt), no logit scale (typical values 0.23-0.36)."""
    sd = read_hps_state_dict(path)
    config = hps_config(sd, vision_heads, text_heads, hidden_act)
    model = build_clip(config, hps_to_transformers(sd), f"HPS checkpoint {path}", device, dtype)
    return CLIPReward(model, load_tokenizer(tokenizer, os.path.dirname(os.path.abspath(path))), scale=1.0)


# -------------------------------------------------------------------------------------------------------------- others

def load_pickscore(folder: str, tokenizer: str | None = None, device=None, dtype=None) -> CLIPReward:
    """PickScore (Kirstain et al. 2023): logit_scale.exp() · cos(f_img, f_txt) on a CLIPModel folder (ViT-H-14)."""
    return CLIPReward(load_clip_model(folder, device, dtype), load_tokenizer(folder, tokenizer), scale=None)


def load_clip_score(folder: str, tokenizer: str | None = None, device=None, dtype=None) -> CLIPReward:
    """CLIP score (Hessel et al. 2021): 100 · cos(f_img, f_txt) with CLIP ViT-L/14.

    NOTE: not clamped at 0 (torchmetrics clamps) so it stays differentiable; the paper's tables report the plain
    cosine (≈ 0.27), i.e. this score / 100.
    """
    return CLIPReward(load_clip_model(folder, device, dtype), load_tokenizer(folder, tokenizer), scale=100.0)


class AestheticMLP(nn.Module):
    """LAION improved aesthetic predictor v2: Linear D-1024-128-64-16-1 with dropouts, no activations."""

    def __init__(self, D: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(D, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, f_img: torch.Tensor) -> torch.Tensor:
        return self.layers(f_img).squeeze(-1)  # (B, D) -> (B,)


class AestheticReward(Reward):
    """LAION aesthetic score: MLP of the unit-norm CLIP ViT-L/14 image embedding; the prompt is ignored."""

    def __init__(self, clip: CLIPModel, mlp: AestheticMLP):
        super().__init__()
        self.clip, self.mlp = clip, mlp.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        pixels = clip_preprocess(images, self.clip.config.vision_config.image_size).to(self.clip.logit_scale.dtype)
        f_img = F.normalize(pooled(self.clip.get_image_features(pixel_values=pixels)).float(), dim=-1)  # (B, D)
        return self.mlp(f_img.to(self.mlp.layers[0].weight.dtype)).float()


def load_aesthetic(clip_folder: str, mlp_path: str, device=None, dtype=None) -> AestheticReward:
    sd = torch_load(mlp_path)
    if not isinstance(sd, dict) or "layers.0.weight" not in sd:
        raise WeightsError(f"{mlp_path}: not a LAION aesthetic MLP state dict (no layers.0.weight)")
    mlp = build_and_load(lambda: AestheticMLP(sd["layers.0.weight"].shape[1]), sd, f"aesthetic MLP {mlp_path}",
                         dtype, device)
    clip = load_clip_model(clip_folder, device, dtype)
    if clip.config.projection_dim != mlp.layers[0].in_features:
        raise WeightsError(f"aesthetic MLP {mlp_path} takes {mlp.layers[0].in_features}-d features but CLIP "
                           f"{clip_folder} gives {clip.config.projection_dim}-d (the MLP needs CLIP ViT-L/14)")
    return AestheticReward(clip, mlp)


class RelativeReward(Reward):
    """SRPO's semantic relative reward (Shen et al. 2025, seed 002) around any text-conditioned reward r:

        score = (1 + k) · r(x, p+ · c) − r(x, p− · c)        p± = a control phrase prepended to the prompt c

    For a CLIP-cosine reward (HPS) this is SRPO's f_img · ((1+k) f_txt(p+) − f_txt(p−)), computed so from one image
    encoding. The text term cancels what the two prompts share, so the part that k does not keep pushes only along
    the control direction ("Realistic photo." vs "Painting.").
    NOTE: k is not published in the abstract; ours k = 1, so the score is the plain reward r(x, p+ · c) plus the
    control-word difference. One class for `--reward rel-NAME` and the Direct-Align baseline alike.
    """

    def __init__(self, base: Reward, positive: str = "Realistic photo.", negative: str = "Painting.", k: float = 1.0):
        super().__init__()
        self.base, self.positive, self.negative, self.k = base, positive, negative, k

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        pos, neg = [f"{self.positive} {p}" for p in prompts], [f"{self.negative} {p}" for p in prompts]
        if isinstance(self.base, CLIPReward):                       # linear in the text feature: one image pass
            f_img = self.base.encode_images(images)                                              # (B, D)
            f_txt = (1 + self.k) * self.base.encode_texts(pos) - self.base.encode_texts(neg)      # (B, D)
            return self.base.scale() * (f_img * f_txt).sum(-1)                                   # (B,)
        return (1 + self.k) * self.base(images, pos) - self.base(images, neg)


def _make_aesthetic(path: str, tokenizer=None, device=None, dtype=None) -> AestheticReward:
    clip_folder, sep, mlp_path = path.partition("+")
    if not sep:
        raise ValueError(f"aesthetic reward needs 'aesthetic:CLIP_L_FOLDER+MLP.pth', got {path!r}")
    return load_aesthetic(clip_folder, mlp_path, device, dtype)


REWARDS: dict[str, RewardMaker] = {
    "hps": lambda path, tokenizer=None, device=None, dtype=None: load_hps(path, tokenizer, device, dtype),
    "pick": lambda path, tokenizer=None, device=None, dtype=None: load_pickscore(path, tokenizer, device, dtype),
    "clip": lambda path, tokenizer=None, device=None, dtype=None: load_clip_score(path, tokenizer, device, dtype),
    "aesthetic": _make_aesthetic,
}
