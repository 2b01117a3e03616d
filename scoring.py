"""Scoring a trained method against the base model: paired samples, intervals, labelled grids, human summaries.

    measure(generate, pipe, prompts, seeds, reward, judge)    one method's samples and every metric (the tables)
    evaluate(method, pipe, reward, prompts, seeds, judge)     base and method measured on the same x_T, paired changes
    paired_change(aligned, base)                             mean paired difference and its standard error
    t_interval(values)                                       mean and 95% t half-width over training seeds
    labelled_grid(rows, captions)                            an image grid a person can read
    summary(metrics, paths)                                  the short table a run ends with

Shape alphabet: B images, H W size, S seeds.
"""
from __future__ import annotations

import math
import os
import textwrap
import time
from typing import Callable

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import files

# two-sided 95% quantiles of Student's t by degrees of freedom (df > 30: the normal's 1.96 is within 4%)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The 95% two-sided t quantile; between table entries the next smaller df's (a slightly wider interval)."""
    return T95[max(k for k in T95 if k <= df)] if df <= 30 else 1.96


def t_interval(values) -> tuple[float, float]:
    """(mean, half-width of its 95% t-interval) of a few values, e.g. one figure per training seed."""
    v = torch.as_tensor(list(values), dtype=torch.float64)
    if len(v) < 2:
        return v.mean().item(), float("nan")
    return v.mean().item(), t95(len(v) - 1) * v.std().item() / math.sqrt(len(v))


def interval_cell(vals: list[float], digits: int) -> str:
    """A table cell: the mean and its t-interval's half-width ("0.123 ± 0.045"), the mean alone for one value, "—" for
    none or a NaN (e.g. diversity with one sample per prompt)."""
    if not vals or any(math.isnan(v) for v in vals):
        return "—"
    mean, half = t_interval(vals)
    return f"{mean:.{digits}f}" if len(vals) < 2 else f"{mean:.{digits}f} ± {half:.{digits}f}"


def paired_change(aligned: torch.Tensor, base: torch.Tensor) -> dict:
    """Mean paired difference aligned - base over the (prompt, seed) samples and its standard error: base and aligned
    share x_T, so the paired error is the one that says whether a change within one run is real. It is not the
    spread between training runs (t_interval over seeds says that). NaN pairs (position, for a prompt without a
    relation) are left out."""
    d = (aligned - base).double()
    d = d[~torch.isnan(d)]
    se = d.std().item() / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"mean": d.mean().item() if len(d) else float("nan"), "se": se}


def evaluate(method, pipe, reward, prompts: list[str], seeds: list[int], judge=None, batch: int = 16,
             desc: str = "evaluate") -> tuple[dict, dict]:
    """The base model and `method` measured on the same samples (measure: the same x_T per (seed, prompt)), and the
    paired change of every per-image score: ({"n", "base", "aligned", "change": {score: {"mean", "se"}}},
    {"base", "aligned": images (S, P, 3, H, W)})."""
    out, images, per = {"n": len(prompts) * len(seeds)}, {}, {}
    for name, make_model in (("base", lambda cond: pipe.backbone),
                             ("aligned", lambda cond: method.sampler_model(cond, pipe.steps))):
        out[name], images[name] = measure(sampler(pipe, make_model), pipe, prompts, seeds, reward, judge, batch=batch,
                                          time_reps=1, desc=f"{desc}, {name}", per_image=True)
        per[name] = out[name].pop("per_image")
    out["change"] = {k: paired_change(torch.tensor(per["aligned"][k]), torch.tensor(per["base"][k]))
                     for k in per["base"]}
    return out, images


def evaluate_sets(method, pipe, reward, sets: dict[str, list[str]], seeds: int, seed: int, judge=None,
                  batch: int = 16) -> tuple[dict, tuple]:
    """Every held-out set x `seeds` samples per prompt, base vs `method` from the same x_T (set j's first sample seed
    10000 (j + 1) + seed): ({set: metrics}, (the first set's prompts, its images))."""
    out, first = {}, None
    for j, (name, ps) in enumerate(sets.items()):
        first_seed = 10_000 * (j + 1) + seed
        out[name], images = evaluate(method, pipe, reward, ps, [first_seed + s * len(ps) for s in range(seeds)],
                                     judge, batch, desc=f"evaluate {name}")
        first = first or (ps, images)
    return out, first


def write_results(out: str, metrics: dict, first) -> list[str]:
    """OUT/metrics.json and OUT/samples.png (the first held-out set's first 8 prompts, base above aligned)."""
    paths = [os.path.join(out, "metrics.json"), os.path.join(out, "samples.png")]
    files.write_json(paths[0], metrics)
    ps, images = first
    n = min(8, len(ps))
    grid = labelled_grid({"base": images["base"][0, :n], "aligned": images["aligned"][0, :n]}, ps[:n],
                         title=f"{metrics['method']}, {metrics['steps']} steps: base vs aligned, same x_T")
    files.save_image(paths[1], grid)
    return paths


# ------------------------------------------------------------------------------------------------- one method measured

def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max − min) / max of the non-background pixels (value > 0.1), per image: (B,)."""
    mx, mn = images.amax(1), images.amin(1)                                    # (B, H, W)
    fg = (mx > 0.1).float()
    s = (mx - mn) / mx.clamp_min(1e-6)
    return (s * fg).sum((1, 2)) / fg.sum((1, 2)).clamp_min(1)


def diversity(emb: torch.Tensor) -> float:
    """emb (S seeds, P prompts, D) unit vectors -> mean over prompts of the mean pairwise cosine distance."""
    S = emb.shape[0]
    if S < 2:
        return float("nan")
    cos = torch.einsum("spd,qpd->psq", emb, emb)                                 # (P, S, S)
    off = ~torch.eye(S, dtype=torch.bool)
    return (1 - cos[:, off]).mean().item()


def clip_embedder(reward) -> Callable | None:
    """The image encoder of the first CLIP-style reward inside `reward` (for diversity), or None."""
    import rewards
    parts = reward.rewards.values() if isinstance(reward, rewards.WeightedSum) else [reward]
    for r in parts:
        base = getattr(r, "base", r)
        if isinstance(base, rewards.CLIPReward):
            return base.encode_images
    return None


def sampler(pipe, make_model: Callable) -> Callable:
    """measure's `generate` for a model-callable factory `make_model(cond)` (a fresh one per batch: HyperAlign's
    sampler keeps state along a trajectory)."""
    def generate(prompts, x_T, seed):
        cond, uncond = pipe.conds(prompts)
        return pipe.decode(pipe.rollout(make_model(cond), x_T, cond, uncond, trajectory=False))
    return generate


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(generate: Callable, pipe, prompts: list[str], seeds: list[int], reward, judge=None,
            embed: Callable | None = None, batch: int = 16, time_reps: int = 3, desc: str = "measure",
            per_image: bool = False) -> tuple[dict, torch.Tensor]:
    """One method over prompts x sample seeds, then scored: (metrics, images (S, P, 3, H, W)).

    `generate(prompts, x_T, seed) -> images`; x_T of the batch starting at i is seeded with seed + i for every method,
    so that every row of a table is scored on the same samples (paired). Metrics: the mean of every reward part
    ("reward/NAME"), the judge's parts ("judge/NAME", position over relational prompts), saturation, diversity
    across seeds, and seconds per image: the fastest of `time_reps` timed runs of the first batch. per_image: also
    "per_image" {"reward/NAME" or "judge/NAME": [value of each (seed, prompt) sample, seed-major]} (position: NaN
    for a prompt without a relation).
    NOTE: the fastest, not the mean: on a shared CPU the other processes only ever add time.
    """
    images, times = [], []
    bar = tqdm(total=len(seeds) * ((len(prompts) + batch - 1) // batch), desc=desc, unit="batch", leave=False)
    for seed in seeds:
        row = []
        for i in range(0, len(prompts), batch):
            p = prompts[i:i + batch]
            x_T = pipe.noise(len(p), torch.Generator().manual_seed(seed + i))
            for _ in range(time_reps if (seed, i) == (seeds[0], 0) else 1):
                _sync(pipe.device)
                t0 = time.perf_counter()
                out = generate(p, x_T, seed + i)
                _sync(pipe.device)
                if (seed, i) == (seeds[0], 0):
                    times.append((time.perf_counter() - t0) / len(p))
            row.append(out.float().cpu())
            bar.update()
        images.append(torch.cat(row))
    bar.close()
    images = torch.stack(images)                                               # (S, P, 3, H, W)
    flat, caps = images.flatten(0, 1), prompts * len(seeds)
    parts = reward.forward_parts(flat.to(pipe.device), caps)[1] if hasattr(reward, "forward_parts") else {
        "reward": reward(flat.to(pipe.device), caps)}
    m = {f"reward/{k}": v.float().mean().item() for k, v in parts.items()}
    each = {f"reward/{k}": v.float().cpu() for k, v in parts.items()}
    if judge is not None:
        from toy.judge import summary as judge_summary
        from toy.world import parse
        verdicts = judge(flat, caps)
        m.update({f"judge/{k}": v for k, v in judge_summary(verdicts, caps).items()})
        relational = torch.tensor([parse(c).relation is not None for c in caps])
        each.update({f"judge/{k}": torch.where(relational, v.float(), torch.nan) if k == "position" else v.float()
                     for k, v in verdicts.items()})
    if per_image:
        m["per_image"] = {k: v.tolist() for k, v in each.items()}
    if embed is not None:
        m["diversity"] = diversity(torch.stack([embed(im.to(pipe.device)).float().cpu() for im in images]))
    m["saturation"] = saturation(flat).mean().item()
    m["sec_per_image"] = min(times)
    return m, images


# ----------------------------------------------------------------------------------------------------------- grids

def labelled_grid(rows: dict[str, torch.Tensor], captions: list[str], min_width: int = 768,
                  title: str = "") -> Image.Image:
    """Rows of images (each (B, 3, H, W) in [0, 1]) as one picture: nearest-upscaled to at least `min_width` pixels,
    the row names on the left, each column's caption above it (wrapped)."""
    names = list(rows)
    B, _, H, W = rows[names[0]].shape
    scale = max(1, math.ceil(min_width / (B * W)))
    h, w = H * scale, W * scale
    font = ImageFont.load_default()
    char_w = max(6, font.getbbox("x")[2])
    line_h = font.getbbox("Ay")[3] + 3
    wrapped = [textwrap.wrap(c, max(8, (w - 4) // char_w)) for c in captions[:B]]
    label_w = max(font.getbbox(n)[2] for n in names) + 12
    top = (1 + max(len(x) for x in wrapped)) * line_h + (line_h + 4 if title else 0)
    canvas = Image.new("RGB", (label_w + B * (w + 4), top + len(names) * (h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for c, lines in enumerate(wrapped):
        for j, line in enumerate(lines):
            draw.text((label_w + c * (w + 4) + 2, top - (len(lines) - j + 0.5) * line_h), line, fill="black", font=font)
    for r, name in enumerate(names):
        y = top + r * (h + 4)
        draw.text((4, y + h // 2 - line_h // 2), name, fill="black", font=font)
        for c in range(B):
            img = (rows[name][c].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (label_w + c * (w + 4), y))
    return canvas


# --------------------------------------------------------------------------------------------------------- summary

def summary(sets: dict[str, dict], paths: list[str] | None = None, adaptivity: dict | None = None) -> str:
    """The short table a run ends with: per held-out set, each reward and the judge (overall, binding, position over
    relational prompts) base -> aligned, the paired change with its 95% interval (± 1.96 SE within this run), and
    the seconds per image of each; then the adaptivity and the files written."""
    lines = [f"{'held-out set':<14} {'n':>5}  {'score':<16} {'base':>8} {'aligned':>8}  {'change (95% CI)':>22}"]
    for name, m in sets.items():
        shown = [k for k in m["change"] if k.startswith("reward/")] + [
            f"judge/{k}" for k in ("overall", "binding", "position") if f"judge/{k}" in m["change"]]
        for key in shown:
            d = m["change"][key]
            lines.append(f"{name:<14} {m['n']:>5}  {key:<16} {m['base'][key]:>8.4f} {m['aligned'][key]:>8.4f}  "
                         f"{d['mean']:>+9.4f} ± {1.96 * d['se']:.4f}")
        lines.append(f"{name:<14} {'':>5}  {'s / image':<16} {m['base']['sec_per_image']:>8.3f} "
                     f"{m['aligned']['sec_per_image']:>8.3f}  "
                     f"{m['aligned']['sec_per_image'] / m['base']['sec_per_image']:>9.2f} × base")
    if adaptivity:
        lines.append(f"adaptivity (share of E|Δθ|² between inputs; 0 = a static LoRA): {adaptivity['x_T']:.2f} at x_T"
                     f" ({adaptivity['n']}), {adaptivity['prompts']:.2f} between prompts" +
                     (f", {adaptivity['trajectory']:.2f} along S trajectories" if "trajectory" in adaptivity else ""))
    if paths:
        lines.append("wrote " + ", ".join(paths))
    return "\n".join(lines)
