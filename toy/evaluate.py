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
from toy import data, judge, world
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


AXIS = {"left of": "above", "right of": "below", "above": "left of", "below": "right of"}


@torch.no_grad()
def conditioning(text_encoder, tokenizer, split: str = "unseen") -> dict[str, float]:
    """How far the U-Net's text context (77, E) moves, relative to its norm, when a relational prompt's relation is
    flipped ("left of" -> "right of") and when its axis changes ("left of" -> "above"), mean over `split`'s relational
    prompts. A model can only draw a direction its context tells apart (v1's toy CLIP: 0.04 against 0.17)."""
    ps = [p for p in world.prompts(split) if world.parse(p).relation is not None]
    ctx = lambda caps: text_encoder(world.tokenize(tokenizer, caps))[0]                  # noqa: E731
    alt = lambda c, m: str(world.Prompt(world.parse(c).objects, m[world.parse(c).relation]))  # noqa: E731
    c0 = ctx(ps)
    rel = lambda c: ((c - c0).flatten(1).norm(dim=1) / c0.flatten(1).norm(dim=1)).mean().item()  # noqa: E731
    return {"flip": rel(ctx([alt(c, world.FLIP) for c in ps])), "axis": rel(ctx([alt(c, AXIS) for c in ps]))}


COMPOSITION_KINDS = ("positions", "colours", "missing", "morph", "flip", "swap", "count", "attribute")


@torch.no_grad()
def composition_accuracy(reward, split: str, n: int = 300, seed: int = 0) -> dict[str, float]:
    """Share of pairs, on n relational prompts of `split` with fresh render seeds, where `reward` prefers the truth:

      positions / colours / missing / morph   the true render over the same layout with the two objects' positions
                                      or colours exchanged, one object left out, or one object's outline morphed
                                      30-70% towards another shape (the same caption for both)
      flip / swap / count / attribute the true caption over a hard-negative caption for the same render (relation
                                      reversed, colours swapped, one object, an attribute changed)
    The table of docs/results.md's composition rewards (any reward with the contract: toy-comp, toy-ir, ...)."""
    rng = random.Random(seed)
    caps = [c for c in world.eval_prompts(split, None, seed) if world.parse(c).relation is not None][:n]
    seeds = [9 * 10**7 + i for i in range(len(caps))]
    pos = world.render_batch(caps, seeds)
    truth = reward(pos, caps)
    out = {}
    for kind in COMPOSITION_KINDS:
        if kind in world.EXCHANGES:              # always the exchange itself (hard_negative_image keeps splits apart)
            wrong = reward(world.to_tensor([world.render(c, s, exchange=kind) for c, s in zip(caps, seeds)]), caps)
        elif kind in ("missing", "morph"):
            wrong = reward(torch.stack([data.hard_negative_image(c, s, kind, rng) for c, s in zip(caps, seeds)]), caps)
        else:
            wrong = reward(pos, [data.hard_negative(c, kind, rng)[0] for c in caps])
        out[kind] = (truth > wrong).float().mean().item()
    return out


def auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties half: 0.5 is a score blind to the label."""
    pos, neg = score[label > 0.5], score[label < 0.5]
    if not len(pos) or not len(neg):
        return float("nan")
    return ((pos[:, None] > neg[None]).double().mean() + 0.5 * (pos[:, None] == neg[None]).double().mean()).item()


@torch.no_grad()
def on_samples(rewards: dict, pipe: pipeline.Pipeline, split: str = "unseen", seeds: tuple[int, ...] = (0, 1)) -> dict:
    """Does a reward see, on the base model's own samples, what the judge sees? For every prompt of `split` x seeds, the
    judge's verdict (all objects bound: right colour and shape) and each reward's score: the AUC of the score for
    that verdict (0.5: blind to it). A reward can be right on renders and blind on a diffusion model's softer
    shapes; this is the measure that says which. The judge only labels here, it trains nothing."""
    caps = world.prompts(split)
    x = torch.cat([sample(pipe, caps[i:i + 64], 5000 + 1000 * s + i) for s in seeds for i in range(0, len(caps), 64)])
    caps = caps * len(seeds)
    bound = (judge.judge(x, caps)["binding"] == 1).float()
    out = {"bound_rate": bound.mean().item()}
    for name, reward in rewards.items():
        score = torch.cat([reward(x[i:i + 128], caps[i:i + 128]) for i in range(0, len(caps), 128)]).float()
        out[f"{name}_auc"] = auc(score, bound)
    return out


def sample(pipe: pipeline.Pipeline, captions: list[str], seed: int = 0) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of the base model at the pipeline's settings, x_T seeded with `seed`."""
    return pipe.generate(captions, pipe.noise(len(captions), torch.Generator().manual_seed(seed)))


GRID_PROMPTS = ["a red circle left of a blue square", "a yellow triangle above a green circle",         # train
                "a magenta square right of a cyan circle", "a blue triangle below a red circle",       # train
                "a red square left of a green circle", "a cyan triangle above a magenta square",       # held out
                "a yellow circle", "a blue triangle"]                                                  # train


def evaluate(cfg: BuildConfig, root: str) -> dict:
    """Judge accuracy of the base models on train, unseen and held-out prompts at the default settings and their
    sample grids; how far the text context tells a relation from its flip (`conditioning`); and every toy reward's
    accuracy on hard pairs (`composition_accuracy`)."""
    import weights
    from toy import rewards as toy_rewards
    out = {}
    sd = pipeline.load(os.path.join(root, "sd"), steps=cfg.sd_steps, guidance=cfg.sd_cfg)
    fx = pipeline.load(os.path.join(root, "flux"), steps=cfg.flux_sample_steps)
    samplers = {"sd": lambda c, s: sample(sd, c, s), "flux": lambda c, s: sample(fx, c, s)}
    for name, sample_ in samplers.items():
        for split in ("train", "unseen", "heldout"):
            caps = world.eval_prompts(split, cfg.eval_prompts)
            x = torch.cat([sample_(caps, seed) for seed in (0, 1)])
            res = judge.summary(judge.judge(x, caps + caps), caps + caps)
            out.update({f"{name}_{split}_{k}": v for k, v in res.items()})
            print(name, split, res, flush=True)
        rows = [sample_(GRID_PROMPTS, seed) for seed in range(4)]
        grid = world.grid(torch.cat([world.render_batch(GRID_PROMPTS, 0)] + rows))
        files.save_image(os.path.join(root, f"{name}_grid.png"), grid)
    files.save_image(os.path.join(root, "world_grid.png"), world.grid(world.render_batch(world.eval_prompts("all", 64))))
    cond = conditioning(weights.load_text_encoder(os.path.join(root, "sd", "text_encoder")),
                        weights.load_tokenizer(os.path.join(root, "sd", "tokenizer")))
    out.update({f"cond_{k}": v for k, v in cond.items()})
    loaded = {}
    for name, make, folder in (("comp", toy_rewards.toy_comp, "comp"), ("ir", toy_rewards.toy_image_reward, "ir"),
                               ("clip", toy_rewards.toy_clip_score, "clip"), ("pref", toy_rewards.toy_preference, "pref")):
        reward = loaded[name] = make(os.path.join(root, folder))
        out.update({f"pairs_{name}_{split}_{k}": v for split in ("unseen", "heldout")
                    for k, v in composition_accuracy(reward, split, cfg.eval_pairs).items()})
    out.update({f"samples_{k}": v for k, v in on_samples(loaded, sd).items()})
    return out
