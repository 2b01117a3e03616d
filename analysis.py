"""Analysis figures as PNG, one command: `python analysis.py` (toy SD, the S run of `python evaluate.py`).

  fig4_curvature.png     relative distance δ_t of successive one-step predictions along base trajectories and its
                         change (the curvature) with P's key steps marked (paper Fig. 4)
  fig8_lora_dynamics.png LoRA weight dynamics along a HyperAlign-S trajectory: cosine similarity of Δθ_t to the
                         first step's Δθ, and the change rate |Δθ_t − Δθ_{t−1}| / |Δθ_{t−1}| (paper Fig. 8)
  fig9_lora_pca.png      PCA of the generated LoRA weights Δθ(x_T, T, c), several seeds per prompt, coloured by
                         prompt (paper Fig. 9)

The numbers behind each figure come from plain functions (tested); the figures only draw them.
Shape alphabet: N sampling steps, B trajectories (prompts x seeds), P flattened LoRA parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import baselines as BL  # noqa: E402
import hyperalign as H  # noqa: E402
import lora  # noqa: E402
import train  # noqa: E402


# -------------------------------------------------------------------------------------------------------- numbers

def one_step_curvature(x0_hats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_hats (N, B, ...) -> δ (N−1, B) = |x0_hat_i − x0_hat_{i−1}| / |x0_hat_{i−1}|, κ (N−2, B) = |δ_{i+1} − δ_i|.

    NOTE: the same rule hyperalign.key_steps ranks (which returns only the chosen steps); recomputed here to plot it.
    """
    x = x0_hats.flatten(2).double()
    delta = (x[1:] - x[:-1]).norm(dim=-1) / x[:-1].norm(dim=-1).clamp_min(1e-12)
    return delta, (delta[1:] - delta[:-1]).abs()


@torch.no_grad()
def base_trajectories(pipe: train.Pipe, prompts: list[str], seed: int) -> dict:
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(len(prompts), torch.Generator().manual_seed(seed), next(pipe.backbone.model.parameters()).device)
    return pipe.rollout(BL.base_model(pipe), x_T, cond, uncond)


def curvature_data(pipe: train.Pipe, prompts: list[str], k: int = 3, seed: int = 0) -> dict:
    """Fig. 4's numbers: δ, κ over base trajectories and the key steps hyperalign.key_steps picks from them."""
    traj = base_trajectories(pipe, prompts, seed)
    delta, kappa = one_step_curvature(traj["x0_hat"])
    return {"t": traj["t"], "delta": delta, "kappa": kappa, "key_steps": H.key_steps(traj["x0_hat"], k)}


def flat_delta_theta(ha: H.HyperAlign, factors: lora.Factors) -> torch.Tensor:
    """Batched factors -> Δθ = s·B·A of every target, flattened and concatenated: (B, P)."""
    return torch.cat([(ha.cfg.scale * B @ A).flatten(1) for A, B in factors.values()], dim=1)


@torch.no_grad()
def lora_dynamics(ha: H.HyperAlign, pipe: train.Pipe, prompts: list[str], seed: int = 0) -> dict:
    """Fig. 8's numbers along HyperAlign-S trajectories: Δθ_t at every step from the state x_t the sampler visits.
    Returns t (N,), cos_first (N, B) = cos(Δθ_t, Δθ_first), change (N−1, B) = |Δθ_t − Δθ_{t−1}| / |Δθ_{t−1}|."""
    cond, uncond = pipe.conds(prompts)
    device = ha.hypernet.proj.weight.device
    x_T = pipe.noise(len(prompts), torch.Generator().manual_seed(seed), device)
    traj = pipe.rollout(ha.sampler_model(cond, "S"), x_T, cond, uncond)
    d = torch.stack([flat_delta_theta(ha, ha.factors(traj["x_t"][i], pipe.t_batch(t, len(prompts), device), cond))
                     for i, t in enumerate(traj["t"])]).double()              # (N, B, P)
    cos = torch.nn.functional.cosine_similarity(d, d[:1].expand_as(d), dim=-1)
    change = (d[1:] - d[:-1]).norm(dim=-1) / d[:-1].norm(dim=-1).clamp_min(1e-30)
    return {"t": traj["t"], "cos_first": cos, "change": change}


@torch.no_grad()
def lora_pca(ha: H.HyperAlign, pipe: train.Pipe, prompts: list[str], seeds: list[int]) -> dict:
    """Fig. 9's numbers: Δθ(x_T, T, c) for every (seed, prompt), projected on its first two principal components.
    Returns xy (S·P, 2), labels (S·P,) prompt index, explained (2,) fraction of variance."""
    cond, _ = pipe.conds(prompts)
    device = ha.hypernet.proj.weight.device
    t0 = pipe.t_batch(pipe.timesteps()[0], len(prompts), device)
    d = torch.cat([flat_delta_theta(ha, ha.factors(pipe.noise(len(prompts), torch.Generator().manual_seed(s), device),
                                                    t0, cond)) for s in seeds]).double()   # (S·P, P)
    d = d - d.mean(0)
    U, S, _ = torch.linalg.svd(d, full_matrices=False)
    U = U * torch.sign(U[0:1]).where(U[0:1] != 0, torch.ones_like(U[0:1]))       # fixed sign: deterministic
    var = S ** 2
    return {"xy": (U[:, :2] * S[:2]).float(), "labels": torch.arange(len(prompts)).repeat(len(seeds)),
            "explained": (var[:2] / var.sum().clamp_min(1e-30)).float()}


# -------------------------------------------------------------------------------------------------------- figures

def plot_curvature(data: dict, path: str, title: str = "") -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = torch.arange(1, data["delta"].shape[0] + 1)
    for name, y, a, x in (("relative distance δ", data["delta"], ax[0], steps),
                          ("curvature |Δδ|", data["kappa"], ax[1], steps[:-1])):   # κ_i at step i, as key_steps
        a.plot(x, y.numpy(), color="0.75", lw=0.8)
        a.plot(x, y.mean(1).numpy(), color="C0", lw=2, label="mean")
        for i, s in enumerate(data["key_steps"]):
            a.axvline(s, color="C3", ls="--", lw=1, label="P key steps" if i == 0 else None)
        a.set_xlabel("sampling step"), a.set_title(name), a.set_yscale("log")
    ax[0].legend()
    fig.suptitle(f"one-step predictions along base trajectories {title}")
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def plot_dynamics(data: dict, path: str, title: str = "") -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    n = data["cos_first"].shape[0]
    for a, y, x, name in ((ax[0], data["cos_first"], torch.arange(n), "cos(Δθ_t, Δθ_first)"),
                          (ax[1], data["change"], torch.arange(1, n), "change rate |Δθ_t − Δθ_t-1| / |Δθ_t-1|")):
        a.plot(x, y.numpy(), color="0.75", lw=0.8)
        a.plot(x, y.mean(1).numpy(), color="C0", lw=2)
        a.set_xlabel("sampling step"), a.set_title(name)
    fig.suptitle(f"LoRA weight dynamics along HyperAlign-S trajectories {title}")
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


def plot_pca(data: dict, prompts: list[str], path: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    xy, lab = data["xy"].numpy(), data["labels"].numpy()
    for i, p in enumerate(prompts):
        ax.scatter(xy[lab == i, 0], xy[lab == i, 1], s=22, color=plt.cm.tab10(i % 10), label=p)
    ev = data["explained"].tolist()
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})"), ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    ax.legend(fontsize=6, loc="best")
    ax.set_title(f"PCA of generated LoRA weights Δθ(x_T, T, c) {title}")
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy-sd", help="toy-sd, toy-flux, or an SD1.5 / FLUX path")
    p.add_argument("--hyper", default=None, help="a trained HyperAlign folder (default runs/table/MODEL/hyperalign-S)")
    p.add_argument("--prompts", default=None, help="prompts, one per line (toy: unseen ones, the split train.py scores)")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, default=6, help="seeds per prompt for the PCA")
    p.add_argument("--key-steps", type=int, default=3)
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (toy 20 as train.py)")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    toy_model = a.model in train.TOY
    pipe = train.load_pipe(a.model, "cpu", torch.float32, None, a.sample_steps or (20 if toy_model else None), None)
    if a.prompts:
        prompts = train.read_lines(a.prompts)[:a.n_prompts]
    else:
        import toy
        prompts = toy.eval_prompts("unseen", a.n_prompts)
    hyper = a.hyper or os.path.join("runs", "table", a.model, "hyperalign-S")
    ha, saved = H.load(hyper, pipe.backbone)
    os.makedirs(a.out, exist_ok=True)
    tag, out = f"({a.model})", {}
    c = curvature_data(pipe, prompts, a.key_steps)
    plot_curvature(c, os.path.join(a.out, "fig4_curvature.png"), tag)
    dyn = lora_dynamics(ha, pipe, prompts)
    plot_dynamics(dyn, os.path.join(a.out, "fig8_lora_dynamics.png"), f"{tag}, {saved.get('step')} steps")
    pca = lora_pca(ha, pipe, prompts, list(range(a.seeds)))
    plot_pca(pca, prompts, os.path.join(a.out, "fig9_lora_pca.png"), tag)
    out = {"key_steps": c["key_steps"], "mean_delta": c["delta"].mean(1).tolist(),
           "cos_first_last": dyn["cos_first"][-1].mean().item(), "change_mean": dyn["change"].mean(1).tolist(),
           "pca_explained": pca["explained"].tolist()}
    with open(os.path.join(a.out, "analysis.json"), "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
