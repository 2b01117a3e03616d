"""The toy world's rewards, behind rewards.py's contract: reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,),
differentiable in the images, frozen. Their names in `--reward` specs are the keys of REWARDS (config.REWARDS joins
them to the real ones); the path is optional: the shipped model. Each one's accuracy on hard pairs (positions or
colours exchanged, an object missing, a relation flipped, ...) is docs/results.md's composition table.

    toy-comp   the toy CLIP fine-tuned on preference pairs from the renderer, as HPS v2 fine-tunes CLIP: sees
               positions, bindings, counts and attributes (>= 98% on every kind of hard pair) and quality;
               the toy default
    toy-clip   CLIP score with the toy CLIP (trained with hard negatives in toy world v2, so it sees composition too)
    toy-pref   an HPS-like head on the toy CLIP, trained on the toy preference pairs: sees quality
    toy-ir     the toy ImageReward (imagereward.py's architecture at toy size), loaded by the same code as the real
               ImageReward: sees counts, missing objects and attributes, and is at chance on positions and on
               binding swaps (a generic matcher at this size did not learn them from the same hard negatives)
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

import rewards
import weights
from toy.world import CLIP_DIR, COMP_DIR, IR_DIR, PREF_DIR, SIZE

def toy_clip_score(path: str = "", tokenizer: str | None = None, device=None, dtype=None) -> "rewards.CLIPReward":
    """CLIP score (Hessel et al. 2021) with the toy CLIP: 100 · cos(f_img, f_txt)."""
    folder = path or CLIP_DIR
    return rewards.CLIPReward(rewards.load_clip_model(folder, device, dtype),
                              weights.load_tokenizer(tokenizer, folder), scale=100.0).freeze()


class PrefHead(nn.Module):
    """HPS-like head: r = cos(img(f_img), txt(f_txt)) + softplus(a) cos_CLIP, where f_img = [CLS, mean patch token]
    of the toy CLIP's vision tower, f_txt its pooled text state, and cos_CLIP the CLIP's own image-text cosine."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.img = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.txt = nn.Linear(width, width)
        self.a = nn.Parameter(torch.zeros(()))      # weight of the CLIP alignment term, softplus(0) = 0.69

    def forward(self, f_img: torch.Tensor, f_txt: torch.Tensor) -> torch.Tensor:
        E = self.width                              # f_img (B, 3E) = [CLS, patches, CLIP embedding]; f_txt (B, 2E)
        clip = F.cosine_similarity(f_img[:, 2 * E:], f_txt[:, E:], dim=-1)
        return F.cosine_similarity(self.img(f_img[:, :2 * E]), self.txt(f_txt[:, :E]), dim=-1) + F.softplus(self.a) * clip


class ToyPreference(rewards.Reward):
    """The toy preference model: PrefHead on the frozen toy CLIP's towers, trained with a Bradley-Terry loss on the
    toy preference pairs (as HPS is trained on HPD's)."""

    def __init__(self, clip, tokenizer, head: PrefHead):
        super().__init__()
        self.clip, self.tokenizer, self.head = clip, tokenizer, head
        self.freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip.vision_model(pixel_values=rewards.clip_preprocess(images, SIZE).to(self.clip.logit_scale.dtype))
        cls = out.pooler_output
        return torch.cat([cls, out.last_hidden_state[:, 1:].mean(1), self.clip.visual_projection(cls)], -1).float()

    @torch.no_grad()
    def text_features(self, prompts) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.clip.logit_scale.device)
        pooled = self.clip.text_model(input_ids=ids).pooler_output
        return torch.cat([pooled, self.clip.text_projection(pooled)], -1).float()  # (B, 2E)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        rewards.check_inputs(images, prompts)
        dtype = self.head.a.dtype  # features come out in float32; the head may be bf16 (--reward-dtype)
        return self.head(self.image_features(images).to(dtype), self.text_features(prompts).to(dtype)).float()


def toy_preference(path: str = "", tokenizer: str | None = None, device=None, dtype=None) -> ToyPreference:
    """The shipped toy preference model (assets/toy/pref/: config.json naming its CLIP folder, head weights)."""
    folder = path or PREF_DIR
    cfg = weights.read_config(folder)
    clip_folder = os.path.normpath(os.path.join(folder, cfg["clip"]))
    head = weights.build_and_load(lambda: PrefHead(cfg["width"]),
                                  weights.read_safetensors(os.path.join(folder, "model.safetensors")),
                                  f"toy preference head {folder}", dtype, device)
    return ToyPreference(rewards.load_clip_model(clip_folder, device, dtype),
                         weights.load_tokenizer(tokenizer, clip_folder), head)


class ToyComp(rewards.CLIPReward):
    """toy-comp: (cos(f_img, f_txt) - mean) / std with the toy CLIP fine-tuned on preference pairs from the renderer
    (toy/train_rewards.py: train_comp_reward), as HPS v2 fine-tunes CLIP on human preferences. It prefers the true
    render to the same layout with the objects' positions or colours exchanged or an object missing, the true caption
    to its relation flipped or colours swapped (docs/results.md: the composition table), and a clean render to a
    degraded one. The judge (toy/judge.py) shares no code or weights with it."""

    def __init__(self, model, tokenizer, mean: float, std: float):
        super().__init__(model, tokenizer, scale=1.0)
        self.mean, self.std = mean, std
        self.freeze()

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return (super().forward(images, prompts) - self.mean) / self.std


def toy_comp(path: str = "", tokenizer: str | None = None, device=None, dtype=None) -> ToyComp:
    """The shipped toy-comp (assets/toy/comp/: a CLIPModel folder with its tokenizer, and score.json: mean, std)."""
    folder = path or COMP_DIR
    norm = weights.read_config(folder, "score.json")
    if not all(isinstance(norm.get(k), (int, float)) for k in ("mean", "std")) or not norm["std"] > 0:
        raise weights.WeightsError(f"{folder}/score.json: needs a number 'mean' and a positive 'std'")
    return ToyComp(rewards.load_clip_model(folder, device, dtype), weights.load_tokenizer(tokenizer, folder),
                   float(norm["mean"]), float(norm["std"]))


def save_comp(reward: ToyComp, folder: str) -> None:
    """The folder toy_comp reads: the fine-tuned CLIPModel, its tokenizer, score.json."""
    import files
    reward.model.save_pretrained(folder)
    reward.tokenizer.save_pretrained(folder)
    files.write_json(os.path.join(folder, "score.json"), {"mean": reward.mean, "std": reward.std})


def toy_image_reward(path: str = "", tokenizer: str | None = None, device=None, dtype=None):
    """The shipped toy ImageReward (assets/toy/ir/: ImageReward.pt, tokenizer/, config.json with the head counts and
    the score's normalisation), through imagereward.load like the real one. `tokenizer` (--reward-tokenizer, the CLIP
    tokenizer of the CLIP-style rewards) is not used: the BERT tokenizer is the one in the folder."""
    import imagereward
    folder = path or IR_DIR
    cfg = weights.read_config(folder)
    return imagereward.load(os.path.join(folder, "ImageReward.pt"), os.path.join(folder, "tokenizer"),
                            device, dtype, cfg["vision_heads"], cfg["text_heads"], cfg["mean"], cfg["std"])


REWARDS: dict[str, rewards.RewardMaker] = {"toy-clip": toy_clip_score, "toy-pref": toy_preference,
                                           "toy-ir": toy_image_reward, "toy-comp": toy_comp}
