"""Analysis figures as PNG, one command: `python analysis.py --hyper DIR` (a train.py --variant S run).

  fig4_curvature.png     relative distance δ_t of successive one-step predictions along base trajectories and its
                         change (the curvature) with P's key steps marked (paper Fig. 4)
  fig8_lora_dynamics.png LoRA weight dynamics along a HyperAlign-S trajectory: cosine similarity of Δθ_t to the
                         first step's Δθ, and the change rate |Δθ_t − Δθ_{t−1}| / |Δθ_{t−1}| (paper Fig. 8)
  fig9_lora_pca.png      PCA of the generated LoRA weights Δθ(x_T, T, c), several seeds per prompt, coloured by
                         prompt (paper Fig. 9)

The numbers behind each figure come from hyperalign.curvature / key_steps and diagnostics.py (tested, and the same
functions train.py reports `adaptivity` with); this file only draws them and writes OUT/analysis.json.
Shape alphabet: N sampling steps, B trajectories (prompts x seeds), P flattened LoRA parameters.
"""
from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import config  # noqa: E402
import diagnostics  # noqa: E402
import files  # noqa: E402
import hyperalign  # noqa: E402
import pipeline  # noqa: E402
import rundir  # noqa: E402
import runs  # noqa: E402


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
    save_figure(fig, path)


def plot_dynamics(data: dict, path: str, title: str = "") -> None:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    n = data["cos_first"].shape[0]
    for a, y, x, name in ((ax[0], data["cos_first"], torch.arange(n), "cos(Δθ_t, Δθ_first)"),
                          (ax[1], data["change"], torch.arange(1, n), "change rate |Δθ_t − Δθ_t-1| / |Δθ_t-1|")):
        a.plot(x, y.numpy(), color="0.75", lw=0.8)
        a.plot(x, y.mean(1).numpy(), color="C0", lw=2)
        a.set_xlabel("sampling step"), a.set_title(name)
    fig.suptitle(f"LoRA weight dynamics along HyperAlign-S trajectories {title}")
    save_figure(fig, path)


def plot_pca(data: dict, prompts: list[str], path: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    xy, lab = data["xy"].numpy(), data["labels"].numpy()
    for i, p in enumerate(prompts):
        ax.scatter(xy[lab == i, 0], xy[lab == i, 1], s=22, color=plt.cm.tab10(i % 10), label=p)
    ev = data["explained"].tolist()
    ax.set_xlabel(f"PC1 ({ev[0]:.0%})"), ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    ax.legend(fontsize=6, loc="best")
    ax.set_title(f"PCA of generated LoRA weights Δθ(x_T, T, c) {title}\nadaptivity {data['adaptivity']:.2f} "
                 f"(share of E|Δθ|² between inputs)", fontsize=9)
    save_figure(fig, path)


def save_figure(fig, path: str) -> None:
    import io
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    files.write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------- main

@torch.no_grad()
def curvature_data(pipe: pipeline.Pipeline, prompts: list[str], k: int = 3, seed: int = 0) -> dict:
    """Fig. 4's numbers: δ, κ over base trajectories and the key steps hyperalign.key_steps picks from them."""
    cond, uncond = pipe.conds(prompts)
    traj = pipe.rollout(pipe.backbone, pipe.noise(len(prompts), torch.Generator().manual_seed(seed)), cond, uncond)
    delta, kappa = hyperalign.curvature(traj["x0_hat"])
    return {"t": traj["t"], "delta": delta, "kappa": kappa, "key_steps": hyperalign.key_steps(traj["x0_hat"], k)}


OUTPUTS = ("fig4_curvature.png", "fig8_lora_dynamics.png", "fig9_lora_pca.png", "analysis.json")


def main(argv=None) -> None:
    code = config.cli(lambda: run(argv))
    if code:
        sys.exit(code)


def run(argv=None) -> None:
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--hyper", required=True, help="a trained run folder (train.py --variant S --out DIR)")
    p.add_argument("--prompts", default="toy:unseen", help="prompts: a text file, one per line, or toy:SPLIT")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--seeds", type=int, default=6, help="seeds per prompt for the PCA")
    p.add_argument("--key-steps", type=int, default=3)
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--overwrite", action="store_true", help="replace the figures if they exist (refused otherwise)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    for name in ("n_prompts", "seeds", "key_steps", "threads"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(a.threads)
    for name in OUTPUTS:
        rundir.check_output(os.path.join(a.out, name), a.overwrite)
    if not os.path.isdir(a.hyper):
        raise rundir.RunError(f"--hyper {a.hyper}: no such run folder")
    saved = rundir.read_config(a.hyper)["run"]
    pipe = pipeline.load(saved["model"], "cpu", torch.float32, saved.get("resolution"), saved.get("resolution"),
                         saved.get("sample_steps"), saved.get("guidance"), saved.get("tokenizer"))
    method, saved = runs.load_trained(a.hyper, pipe.backbone)
    prompts = config.read_prompts(a.prompts)
    prompts = world_sample(prompts, a.n_prompts)
    os.makedirs(a.out, exist_ok=True)
    tag = f"({os.path.basename(os.path.normpath(saved['run']['model']))}, {saved['step']} steps)"
    c = curvature_data(pipe, prompts, a.key_steps)
    plot_curvature(c, os.path.join(a.out, OUTPUTS[0]), tag)
    dyn = diagnostics.along_trajectory(method, pipe, prompts)
    plot_dynamics(dyn, os.path.join(a.out, OUTPUTS[1]), tag)
    pca = diagnostics.at_x_T(method, pipe, prompts, list(range(a.seeds)))
    plot_pca(pca, prompts, os.path.join(a.out, OUTPUTS[2]), tag)
    out = {"run": a.hyper, "key_steps": c["key_steps"], "mean_delta": c["delta"].mean(1).tolist(),
           "cos_first_last": dyn["cos_first"][-1].mean().item(), "change_mean": dyn["change"].mean(1).tolist(),
           "adaptivity_x_T": pca["adaptivity"], "adaptivity_prompts": pca["adaptivity_prompts"],
           "adaptivity_trajectory": dyn["adaptivity"], "pca_explained": pca["explained"].tolist()}
    files.write_json(os.path.join(a.out, OUTPUTS[3]), out)
    print(json.dumps(out))


def world_sample(prompts: list[str], n: int) -> list[str]:
    """n prompts spread over the list (a fixed, deterministic choice)."""
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


if __name__ == "__main__":
    main()
