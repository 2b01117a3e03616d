"""The toy build's measurements (`python -m toy build`): VAE PSNR and CLIP retrieval after their stages, then the
judge accuracy of the base models on train and held-out prompts and their sample grids (stage eval).
"""
from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F

import files
import pipeline
import rewards
from toy import judge, world
from toy.train_models import BuildConfig


@torch.no_grad()
def vae_psnr(vae, split: str = "heldout", n: int = 256) -> float:
    """Mean PSNR (dB) of decode(encode(x)) on n renders of `split` prompts (images in [0, 1])."""
    caps = world.eval_prompts(split, n, seed=1)
    x = world.render_batch(caps, 2 * 10**6)
    x_rec = ((vae.decode(vae.encode(x * 2 - 1)).clamp(-1, 1) + 1) / 2)
    mse = (x_rec - x).square().mean((1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


@torch.no_grad()
def clip_retrieval(model, tokenizer, split: str, n: int = 100, seed: int = 0) -> float:
    """Top-1 text -> image retrieval among n renders of n distinct prompts of `split` (chance 1/n).

    Only 'left of' / 'above' relations are used, so no two candidates describe the same scene.
    """
    ps = [p for p in world.prompts(split) if "right of" not in p and "below" not in p]
    ps = random.Random(seed).sample(ps, min(n, len(ps)))
    f_txt = F.normalize(rewards.pooled(model.get_text_features(input_ids=world.tokenize(tokenizer, ps))), dim=-1)
    pixels = rewards.clip_preprocess(world.render_batch(ps, 10**6), world.SIZE)
    f_img = F.normalize(rewards.pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
    return ((f_txt @ f_img.T).argmax(1) == torch.arange(len(ps))).float().mean().item()


def sample(pipe: pipeline.Pipeline, captions: list[str], seed: int = 0) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of the base model at the pipeline's settings, x_T seeded with `seed`."""
    return pipe.generate(captions, pipe.noise(len(captions), torch.Generator().manual_seed(seed)))


GRID_PROMPTS = ["a red circle left of a blue square", "a yellow triangle above a green circle",         # train
                "a magenta square right of a cyan circle", "a blue triangle below a red circle",       # train
                "a red square left of a green circle", "a cyan triangle above a magenta square",       # held out
                "a yellow circle", "a blue triangle"]                                                  # train


def evaluate(cfg: BuildConfig, root: str) -> dict:
    """Judge accuracy of the base models on train and held-out prompts at the default settings; sample grids."""
    out = {}
    sd = pipeline.load(os.path.join(root, "sd"), steps=cfg.sd_steps, guidance=cfg.sd_cfg)
    fx = pipeline.load(os.path.join(root, "flux"), steps=cfg.flux_sample_steps)
    samplers = {"sd": lambda c, s: sample(sd, c, s), "flux": lambda c, s: sample(fx, c, s)}
    for name, sample in samplers.items():
        for split in ("train", "heldout"):
            caps = world.eval_prompts(split, cfg.eval_prompts)
            x = torch.cat([sample(caps, seed) for seed in (0, 1)])
            res = judge.summary(judge.judge(x, caps + caps), caps + caps)
            out.update({f"{name}_{split}_{k}": v for k, v in res.items()})
            print(name, split, res, flush=True)
        rows = [sample(GRID_PROMPTS, seed) for seed in range(4)]
        grid = world.grid(torch.cat([world.render_batch(GRID_PROMPTS, 0)] + rows))
        files.save_image(os.path.join(root, f"{name}_grid.png"), grid)
    files.save_image(os.path.join(root, "world_grid.png"), world.grid(world.render_batch(world.eval_prompts("all", 64))))
    return out
