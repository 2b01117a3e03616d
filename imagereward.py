"""ImageReward (Xu et al. 2023), the paper's fourth table metric, hosted in transformers' BlipForImageTextRetrieval.

    image_embeds = ViT(preprocess(image))                          BLIP's ViT-L/16: 24 layers, 16 heads, width 1024
    h            = BERT(prompt tokens, cross-attending to image_embeds)[:, 0]      12 layers, 12 heads, width 768
    score        = (MLP(h) − mean) / std                          MLP 768-1024-128-64-16-1, no activations

The released `ImageReward.pt` is a state dict of ImageReward's own BLIP (keys `blip.visual_encoder.*`,
`blip.text_encoder.*`, `blip.vision_proj.*`, `blip.text_proj.*`, `mlp.layers.*`): the vision keys are renamed by
the rules of transformers' BLIP conversion, the text-encoder keys already match transformers' BlipTextModel.
No `image-reward` package is needed. Captions are padded / cut to 35 tokens ([CLS] first), images resized (bicubic,
short side) and centre-cropped to the ViT's input size with CLIP's normalisation, as ImageReward does, but
differentiably (rewards.clip_preprocess). The config is read off the weights' shapes; head counts are not visible in
them (defaults: ImageReward's 16 / 12), nor are the score's mean and std (defaults: ImageReward's).

Shape alphabet: B batch, H W image size, S input size, N image tokens, L text tokens, D width.
"""
from __future__ import annotations

import math
import os
import re
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import BlipConfig, BlipForImageTextRetrieval

import weights
from rewards import AestheticMLP, Reward, check_inputs, clip_preprocess
from weights import WeightsError

MEAN, STD = 0.16717362830052426, 1.0333394966054072     # ImageReward's normalisation of the MLP's output
MAX_LENGTH = 35                                          # ImageReward's caption length

# ImageReward.pt (BLIP's timm-style ViT) -> transformers BlipVisionModel names; everything else keeps its name
RULES = [
    (r"^blip\.visual_encoder\.patch_embed\.proj\.", "blip.vision_model.embeddings.patch_embedding."),
    (r"^blip\.visual_encoder\.cls_token$", "blip.vision_model.embeddings.class_embedding"),
    (r"^blip\.visual_encoder\.pos_embed$", "blip.vision_model.embeddings.position_embedding"),
    (r"^blip\.visual_encoder\.norm\.", "blip.vision_model.post_layernorm."),
    (r"^blip\.visual_encoder\.blocks\.", "blip.vision_model.encoder.layers."),
    (r"(vision_model\.encoder\.layers\.\d+)\.norm([12])\.", r"\1.layer_norm\2."),
    (r"(vision_model\.encoder\.layers\.\d+)\.attn\.qkv\.", r"\1.self_attn.qkv."),
    (r"(vision_model\.encoder\.layers\.\d+)\.attn\.proj\.", r"\1.self_attn.projection."),
]


# ours -> ImageReward.pt: the inverse of RULES (the toy world writes its ImageReward in the released layout)
TO_RELEASE = [
    (r"^blip\.vision_model\.embeddings\.patch_embedding\.", "blip.visual_encoder.patch_embed.proj."),
    (r"^blip\.vision_model\.embeddings\.class_embedding$", "blip.visual_encoder.cls_token"),
    (r"^blip\.vision_model\.embeddings\.position_embedding$", "blip.visual_encoder.pos_embed"),
    (r"^blip\.vision_model\.post_layernorm\.", "blip.visual_encoder.norm."),
    (r"^blip\.vision_model\.encoder\.layers\.", "blip.visual_encoder.blocks."),
    (r"(visual_encoder\.blocks\.\d+)\.layer_norm([12])\.", r"\1.norm\2."),
    (r"(visual_encoder\.blocks\.\d+)\.self_attn\.qkv\.", r"\1.attn.qkv."),
    (r"(visual_encoder\.blocks\.\d+)\.self_attn\.projection\.", r"\1.attn.proj."),
]


class ImageRewardModel(nn.Module):
    """BlipForImageTextRetrieval without its image-text-matching head (ImageReward has none) + ImageReward's MLP."""

    def __init__(self, config: BlipConfig):
        super().__init__()
        self.blip = BlipForImageTextRetrieval(config)
        del self.blip.itm_head
        self.mlp = AestheticMLP(config.text_config.hidden_size)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) preprocessed, ids / mask (B, L) -> MLP output (B,)."""
        return self.score_embeds(self.blip.vision_model(pixel_values=pixels).last_hidden_state, ids, mask)

    def score_embeds(self, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoded images (B, N, D_v), ids / mask (B, L) -> MLP output (B,): one image can be scored against many
        captions without encoding it again."""
        text = self.blip.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                      encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long,
                                                                        device=ids.device),
                                      is_decoder=False).last_hidden_state                         # (B, L, D)
        return self.mlp(text[:, 0].to(self.mlp.layers[0].weight.dtype))


def _layers(sd: Mapping, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def config_from_keys(sd: Mapping[str, torch.Tensor], vision_heads: int = 16, text_heads: int = 12) -> BlipConfig:
    """BlipConfig of an ImageReward state dict (our names), read off its shapes; heads are given (not visible)."""
    try:
        D_v, _, P, _ = sd["blip.vision_model.embeddings.patch_embedding.weight"].shape
        n_pos = sd["blip.vision_model.embeddings.position_embedding"].shape[1]
        vocab, D_t = sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape
        positions = sd["blip.text_encoder.embeddings.position_embeddings.weight"].shape[0]
        v_mlp = sd["blip.vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        t_mlp = sd["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]
        proj = sd["blip.vision_proj.weight"].shape[0]
    except KeyError as e:
        raise WeightsError(f"not an ImageReward checkpoint (missing {e})") from None
    vision = dict(hidden_size=D_v, intermediate_size=v_mlp, num_hidden_layers=_layers(sd, "blip.vision_model.encoder"
                  ".layers."), num_attention_heads=vision_heads, image_size=math.isqrt(n_pos - 1) * P, patch_size=P,
                  layer_norm_eps=1e-6)                   # NOTE: BLIP's ViT uses 1e-6 (transformers' default: 1e-5)
    text = dict(vocab_size=vocab, hidden_size=D_t, encoder_hidden_size=D_v, intermediate_size=t_mlp,
                num_hidden_layers=_layers(sd, "blip.text_encoder.encoder.layer."), num_attention_heads=text_heads,
                max_position_embeddings=positions, layer_norm_eps=1e-12, bos_token_id=None, sep_token_id=None,
                pad_token_id=0)
    try:
        return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=proj)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"ImageReward checkpoint: {e}") from None


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """ImageReward.pt (a torch state dict; also {'state_dict': ...}) or a .safetensors file, renamed to our keys."""
    sd = weights.read_safetensors(path) if path.endswith(".safetensors") else weights.torch_load(path)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path}: not an ImageReward state dict")
    return weights.rename(sd, RULES)


class ImageReward(Reward):
    """score = (MLP(BLIP text encoder on prompt ⋈ image)[CLS] − mean) / std, differentiable in the images."""

    def __init__(self, model: ImageRewardModel, tokenizer, mean: float = MEAN, std: float = STD):
        super().__init__()
        self.model, self.tokenizer, self.mean, self.std = model, tokenizer, mean, std
        self.size = model.blip.config.vision_config.image_size
        self.max_length = min(MAX_LENGTH, model.blip.config.text_config.max_position_embeddings)
        self.freeze()

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_inputs(images, prompts)
        pixels = clip_preprocess(images, self.size).to(self.model.mlp.layers[0].weight.dtype)     # (B, 3, S, S)
        return self.score(self.model.blip.vision_model(pixel_values=pixels).last_hidden_state, prompts)

    def score(self, image_embeds: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The normalised score of encoded images (B, N, D_v) against their prompts [B]: (B,)."""
        device = self.model.mlp.layers[0].weight.device
        text = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        out = self.model.score_embeds(image_embeds, text.input_ids.to(device), text.attention_mask.to(device))
        return (out.float() - self.mean) / self.std                                              # (B,)


def load(path: str, tokenizer: str | None = None, device=None, dtype=None, vision_heads: int = 16,
         text_heads: int = 12, mean: float = MEAN, std: float = STD) -> ImageReward:
    """ImageReward from its released checkpoint and a BERT tokenizer folder (bert-base-uncased's will do; default:
    a tokenizer/ folder beside the checkpoint), loaded strictly."""
    sd = read_checkpoint(path)
    config = config_from_keys(sd, vision_heads, text_heads)
    model = weights.build_and_load(lambda: ImageRewardModel(config), sd, f"ImageReward checkpoint {path}", dtype,
                                   device)
    folder = weights.load_tokenizer(tokenizer, os.path.dirname(os.path.abspath(path)), kind="bert")
    return ImageReward(model, folder, mean, std)


def _make(path: str, tokenizer=None, device=None, dtype=None) -> ImageReward:
    """`imagereward:ImageReward.pt+BERT_TOKENIZER_FOLDER` (the folder may be left out: tokenizer/ beside the .pt).
    --reward-tokenizer is not used here: it is the CLIP tokenizer that HPS and PickScore share."""
    checkpoint, _, folder = path.partition("+")
    return load(checkpoint, folder or None, device, dtype)


REWARDS = {"imagereward": _make}
