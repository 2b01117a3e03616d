"""The toy world's last two build stages, called by `toy_train.build` (`python toy.py build`):

  # ---- prefs     toy preference pairs (Pick-a-Pic parquet) and the HPS-like preference head on the frozen toy CLIP
  # ---- evaluate  VAE PSNR, CLIP retrieval (called by the vae / clip stages), judge accuracy of samples from the
                 base models on train and held-out prompts; sample grids

The samplers here (`sample_sd`, `sample_flux`) are the toy models' default settings, reused by the tests.
"""
from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

import toy
from toy_train import BuildConfig, _opt, _save, _step, pixels, tokenize, twin


# ------------------------------------------------------------------------------------------------------------ prefs

# NOTE: the rejected images cover the two things people mark down in real preference data: quality (blur, noise,
# washed-out, a colour cast, blotchy off-palette colours) and alignment (a wrong attribute or relation, a missing
# object). Without the last two kinds the preference model cannot see the errors reward hacking makes on the toy
# (objects that split into off-colour blotches or vanish); with them its score falls on hacked samples.
DEGRADATIONS = ("blur", "noise", "washed", "cast", "wrong", "missing", "tint")


def degrade(caption: str, seed: int, kind: str, rng: random.Random):
    """The rejected image of a pair: the clean render degraded, a render of a wrong-attribute twin caption, or the
    same layout with one object left out."""
    from PIL import ImageFilter
    if kind == "wrong":
        return toy.render(twin(caption, rng), seed)
    if kind == "missing":  # a one-object caption leaves the empty canvas
        return toy.render(caption, seed, omit=rng.randrange(len(toy.parse(caption).objects)))
    img = toy.render(caption, seed)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.5)))
    x = toy.to_tensor([img])
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        x = x + rng.uniform(0.08, 0.2) * torch.randn(x.shape, generator=g)
    elif kind == "washed":
        a = rng.uniform(0.3, 0.6)
        x = (1 - a) * x + a * 0.5
    elif kind == "cast":  # on one channel, over the whole image
        x[:, rng.randrange(3)] += rng.uniform(0.25, 0.5)
    else:  # tint: the objects pulled towards another palette colour by a smooth random amount (blotches)
        amount = rng.uniform(0.3, 0.7) * F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=x.shape[-2:],
                                                       mode="bilinear", align_corners=False)
        target = torch.tensor(toy.PALETTE[rng.choice(toy.COLOURS)]).view(1, 3, 1, 1) / 255
        x = x + (x.amax(1, keepdim=True) > 0.2) * amount * (target - x)
    return toy.to_pil(x.clamp(0, 1))[0]


def make_pairs(n: int, split: str, seed: int) -> list[tuple[str, object, object, str]]:
    """n (caption, chosen, rejected, kind) with PIL images; kinds cycle through DEGRADATIONS."""
    rng, ps = random.Random(seed), toy.prompts(split)
    out = []
    for i in range(n):
        c, kind = rng.choice(ps), DEGRADATIONS[i % len(DEGRADATIONS)]
        out.append((c, toy.render(c, seed * 10**6 + i), degrade(c, seed * 10**6 + i, kind, rng), kind))
    return out


def write_prefs_parquet(pairs, path: str, seed: int) -> None:
    """Pick-a-Pic v2 layout: caption, jpg_0, jpg_1 (image bytes; PNG here, lossless), label_0, label_1."""
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    rng, rows = random.Random(seed), []
    for caption, chosen, rejected, _ in pairs:
        first = rng.random() < 0.5       # the preferred image on either side, as in Pick-a-Pic
        a, b = (chosen, rejected) if first else (rejected, chosen)
        rows.append({"caption": caption, "jpg_0": png(a), "jpg_1": png(b), "label_0": float(first),
                     "label_1": float(not first)})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=512)


@torch.no_grad()
def _pair_features(model: "toy.ToyPreference", pairs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    caps = [p[0] for p in pairs]
    f_txt = torch.cat([model.text_features(caps[i:i + 512]) for i in range(0, len(caps), 512)])
    feats = [torch.cat([model.image_features(toy.to_tensor([p[j] for p in pairs[i:i + 512]]))
                        for i in range(0, len(pairs), 512)]) for j in (1, 2)]
    return f_txt, feats[0], feats[1]


def build_prefs(cfg: BuildConfig, root: str) -> dict:
    """prefs.parquet from train prompts, then the preference head: Bradley-Terry on (chosen, rejected) pairs,
    -log sigmoid(s (r_chosen - r_rejected)) with s = 20 (r is a cosine). Reports pair accuracy on held-out prompts."""
    import rewards
    import weights
    pairs = make_pairs(cfg.pref_pairs, "train", cfg.seed + 7)
    write_prefs_parquet(pairs, os.path.join(root, "prefs.parquet"), cfg.seed + 8)
    clip = rewards.load_clip_model(os.path.join(root, "clip"))
    tokenizer = weights.load_tokenizer(os.path.join(root, "clip"))
    torch.manual_seed(cfg.seed)
    model = toy.ToyPreference(clip, tokenizer, toy.PrefHead(cfg.clip_width))
    head = model.head.requires_grad_(True)
    f_txt, f_c, f_r = _pair_features(model, pairs)
    opt, sched = _opt(head.parameters(), 3e-3, cfg.pref_steps)
    g = torch.Generator().manual_seed(cfg.seed + 9)
    for _ in tqdm(range(cfg.pref_steps), desc="preference head"):
        i = torch.randint(len(pairs), (256,), generator=g)
        loss = -F.logsigmoid(20 * (head(f_c[i], f_txt[i]) - head(f_r[i], f_txt[i]))).mean()
        _step(opt, sched, loss)
    head.eval().requires_grad_(False)
    _save(head, os.path.join(root, "pref"), {"clip": "../clip", "width": cfg.clip_width}, "model.safetensors")
    test = make_pairs(500, "heldout", cfg.seed + 10)
    f_txt, f_c, f_r = _pair_features(model, test)
    right = (head(f_c, f_txt) > head(f_r, f_txt)).float()
    out = {"pref_acc_heldout": right.mean().item()}
    out.update({f"pref_acc_heldout_{k}": right[[i for i, p in enumerate(test) if p[3] == k]].mean().item()
                for k in DEGRADATIONS})
    return out


# --------------------------------------------------------------------------------------------------------- evaluate

@torch.no_grad()
def vae_psnr(vae, split: str = "heldout", n: int = 256) -> float:
    """Mean PSNR (dB) of decode(encode(x)) on n renders of `split` prompts (images in [0, 1])."""
    caps = toy.eval_prompts(split, n, seed=1)
    x = toy.render_batch(caps, 2 * 10**6)
    x_rec = ((vae.decode(vae.encode(x * 2 - 1)).clamp(-1, 1) + 1) / 2)
    mse = (x_rec - x).square().mean((1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


@torch.no_grad()
def clip_retrieval(model, tokenizer, split: str, n: int = 100, seed: int = 0) -> float:
    """Top-1 text -> image retrieval among n renders of n distinct prompts of `split` (chance 1/n).

    Only 'left of' / 'above' relations are used, so no two candidates describe the same scene.
    """
    ps = [p for p in toy.prompts(split) if "right of" not in p and "below" not in p]
    ps = random.Random(seed).sample(ps, min(n, len(ps)))
    from rewards import _pooled
    f_txt = F.normalize(_pooled(model.get_text_features(input_ids=tokenize(tokenizer, ps))), dim=-1)
    f_img = F.normalize(_pooled(model.get_image_features(pixel_values=pixels(toy.render_batch(ps, 10**6)))), dim=-1)
    return ((f_txt @ f_img.T).argmax(1) == torch.arange(len(ps))).float().mean().item()


@torch.no_grad()
def sample_sd(pipe, captions: list[str], seed: int = 0, steps: int = 25, guidance: float = 5.0) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from an SDPipeline (weights.load_sd): DDIM + classifier-free guidance."""
    from sampler import VPSchedule, ddim_sample
    context, uncond = pipe.encode_prompt(captions), pipe.encode_prompt([""] * len(captions))
    g = torch.Generator().manual_seed(seed)
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x_T = torch.randn(len(captions), 4, toy.SIZE // f, toy.SIZE // f, generator=g)
    z0 = ddim_sample(pipe.unet, x_T, context, VPSchedule.from_config(pipe.scheduler), steps, uncond=uncond,
                     guidance=guidance)
    return (pipe.vae.decode(z0).clamp(-1, 1) + 1) / 2


@torch.no_grad()
def sample_flux(pipe, captions: list[str], seed: int = 0, steps: int = 25) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from a FluxPipe (weights.load_flux_pipeline): Euler on the rectified flow."""
    from sampler import flow_sample, flux_cond, flux_model_fn, image_ids, pack, unpack
    txt, y = pipe.encode(captions)
    g = torch.Generator().manual_seed(seed)
    h = toy.SIZE // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    x_T = pack(torch.randn(len(captions), pipe.vae.config.latent_channels, h, h, generator=g))
    z0 = flow_sample(flux_model_fn(pipe.transformer), x_T, flux_cond(txt, y, image_ids(len(captions), h, h)), steps,
                     shift=pipe.shift)
    return (pipe.vae.decode(unpack(z0, h, h)).clamp(-1, 1) + 1) / 2


GRID_PROMPTS = ["a red circle left of a blue square", "a yellow triangle above a green circle",         # train
                "a magenta square right of a cyan circle", "a blue triangle below a red circle",       # train
                "a red square left of a green circle", "a cyan triangle above a magenta square",       # held out
                "a yellow circle", "a blue triangle"]                                                  # train


def evaluate(cfg: BuildConfig, root: str) -> dict:
    """Judge accuracy of the base models on train and held-out prompts at the default settings; sample grids."""
    import weights
    out = {}
    sd = weights.load_sd(os.path.join(root, "sd"))
    fx = weights.load_flux_pipeline(os.path.join(root, "flux"))
    samplers = {"sd": lambda c, s: sample_sd(sd, c, s, cfg.sd_steps, cfg.sd_cfg),
                "flux": lambda c, s: sample_flux(fx, c, s, cfg.flux_sample_steps)}
    for name, sample in samplers.items():
        for split in ("train", "heldout"):
            caps = toy.eval_prompts(split, cfg.eval_prompts)
            x = torch.cat([sample(caps, seed) for seed in (0, 1)])
            res = toy.summary(toy.judge(x, caps + caps), caps + caps)
            out.update({f"{name}_{split}_{k}": v for k, v in res.items()})
            print(name, split, res, flush=True)
        rows = [sample(GRID_PROMPTS, seed) for seed in range(4)]
        toy.grid(torch.cat([toy.render_batch(GRID_PROMPTS, 0)] + rows)).save(os.path.join(root, f"{name}_grid.png"))
    toy.grid(toy.render_batch(toy.eval_prompts("all", 64), 0)).save(os.path.join(root, "world_grid.png"))
    return out
