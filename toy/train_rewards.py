"""Training the toy world's reward models (`python -m toy build`, stage prefs): the HPS-like preference head
(Bradley-Terry on the toy preference pairs, as HPS is trained on HPD's).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

import rewards
import weights
from toy import world
from toy.data import DEGRADATIONS, make_pairs
from toy.rewards import PrefHead, ToyPreference
from toy.train_models import BuildConfig, optimizer, step

@torch.no_grad()
def _pair_features(model: ToyPreference, pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    caps = [p[0] for p in pairs]
    f_txt = torch.cat([model.text_features(caps[i:i + 512]) for i in range(0, len(caps), 512)])
    feats = [torch.cat([model.image_features(world.to_tensor([p[j] for p in pairs[i:i + 512]]))
                        for i in range(0, len(pairs), 512)]) for j in (1, 2)]
    return f_txt, feats[0], feats[1]


def train_preference_head(cfg: BuildConfig, clip_folder: str, pairs) -> tuple[PrefHead, dict]:
    """The preference head on the frozen toy CLIP: Bradley-Terry on (chosen, rejected) pairs,
    -log sigmoid(s (r_chosen - r_rejected)) with s = 20 (r is a cosine). Returns (head, pair accuracy on held-out
    prompts, overall and per kind of rejected image)."""
    clip = rewards.load_clip_model(clip_folder)
    tokenizer = weights.load_tokenizer(clip_folder)
    torch.manual_seed(cfg.seed)
    model = ToyPreference(clip, tokenizer, PrefHead(cfg.clip_width))
    head = model.head.requires_grad_(True)
    f_txt, f_c, f_r = _pair_features(model, pairs)
    opt, sched = optimizer(head.parameters(), 3e-3, cfg.pref_steps)
    g = torch.Generator().manual_seed(cfg.seed + 9)
    for _ in tqdm(range(cfg.pref_steps), desc="preference head"):
        i = torch.randint(len(pairs), (256,), generator=g)
        loss = -F.logsigmoid(20 * (head(f_c[i], f_txt[i]) - head(f_r[i], f_txt[i]))).mean()
        step(opt, sched, loss)
    head.eval().requires_grad_(False)
    test = make_pairs(500, "heldout", cfg.seed + 10)
    f_txt, f_c, f_r = _pair_features(model, test)
    right = (head(f_c, f_txt) > head(f_r, f_txt)).float()
    out = {"pref_acc_heldout": right.mean().item()}
    out.update({f"pref_acc_heldout_{k}": right[[i for i, p in enumerate(test) if p[3] == k]].mean().item()
                for k in DEGRADATIONS})
    return head, out
