"""Can training make HyperAlign's LoRA depend on the prompt when the reward asks for it? A probe with a known answer.

The reward is colour, which every method here learns fast: r = s(prompt) * (mean red - mean blue) of the image, with
s = +1 for "left of" prompts and, in the "opposite" task, s = -1 for "right of" prompts ("same": +1 for both). In
"opposite" the best single LoRA gains nothing on average (what it adds to one group it takes from the other); a
LoRA per relation (the oracle, two static LoRAs trained on half the steps each, picked by reading the prompt) shows
what adapting is worth. HyperAlign-I sees the prompt and has to find that out itself. "same" is the positive
control: every method should gain there, so a zero in "opposite" is a statement about adapting, not about training.

    python benchmarks/probe_adaptive.py [--steps 150] [--seeds 0] [--json docs/results/probe-adaptive.json]
        [--tasks same,opposite] [--methods "HyperAlign-I,HyperAlign-S@0.0003,static LoRA,oracle: a LoRA per relation"]
        [--batch-size 4] [--head-gain 0.01] [--rank 4] [--keep runs/probe] [--in-sample]
    python benchmarks/probe_adaptive.py --gradients [--seeds 0] [--json docs/results/probe-gradients.json]

Trains on the toy world's hyper-train prompts with "left of" / "right of", lambda_reg 0 (no L_G), the v2 search's
learning rates; scores on the val prompts with the same relations, aligned vs base from the same x_T (--in-sample: on
56 of the training prompts as well, to tell not learning from not generalising). --keep DIR keeps the trained runs
(benchmarks/diagnose_decoder.py reads them). --head-gain sets hyperalign.HEAD_GAIN, the scale of the decoder's head at
initialisation, for this run only (a fix tried, docs/results.md §7).

--gradients trains nothing: it asks what the reward's gradient tells the hypernetwork at initialisation. One L_R step
(losses.training_step, λ = 0) on 64 training prompts, 32 per relation; each sample's gradient with respect to its own
generated core M (samples do not share a LoRA, so the batch gradient holds them all). Per task: the mean gradient of
each relation, their cosine, the part they share and the part that differs, and the spread of single samples.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import files  # noqa: E402
import hyperalign  # noqa: E402
import losses  # noqa: E402
import methods  # noqa: E402
import runs  # noqa: E402
from toy import world  # noqa: E402

RELATIONS = (" left of ", " right of ")
ORACLE = "oracle: a LoRA per relation"


def relation(prompt: str) -> str:
    return next(r.strip() for r in RELATIONS if r in prompt)


def colour_reward(task: str):
    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        s = torch.tensor([1.0 if task == "same" or relation(p) == "left of" else -1.0 for p in prompts],
                         device=images.device)
        return s * (images[:, 0].mean((1, 2)) - images[:, 2].mean((1, 2)))
    return reward


def split(name: str) -> list[str]:
    return [p for p in world.prompts(name) if any(r in p for r in RELATIONS)]


def train(kind: str, cfg, prompts: list[str], pipe, reward, tmp: str, out: str | None = None):
    """One run on `prompts` (a file in tmp) into `out` (default: in tmp) -> the trained method."""
    path = os.path.join(tmp, f"{kind}-{len(prompts)}-{abs(hash(tuple(prompts)))}.txt")
    with open(path, "w") as f:
        f.write("\n".join(prompts))
    cfg = replace(cfg, prompts=path, out=out or os.path.join(tmp, os.path.basename(path)[:-4]))
    runs.train(methods.builder(kind, cfg), cfg, overwrite=True, pipe=pipe, reward=reward)
    return runs.load_trained(cfg.out, pipe.backbone)[0]


def gains(pipe, make_model, reward, prompts: list[str], seed: int) -> dict:
    """Mean reward gain over the base model per relation, same x_T."""
    x = pipe.noise(len(prompts), torch.Generator().manual_seed(1000 + seed))
    cond, uncond = pipe.conds(prompts)
    with torch.no_grad():
        base = pipe.decode(pipe.rollout(pipe.backbone, x, cond, uncond, trajectory=False))
        aligned = pipe.decode(pipe.rollout(make_model(cond, prompts), x, cond, uncond, trajectory=False))
    gain = reward(aligned, prompts) - reward(base, prompts)
    return {r.strip(): gain[torch.tensor([r in p for p in prompts])].mean().item() for r in RELATIONS}


def gradients(pipe, reward, prompts: list[str], seed: int) -> dict:
    """The L_R gradient with respect to each sample's core M, for a fresh HyperAlign-I (see the module docstring)."""
    torch.manual_seed(seed)
    ha = hyperalign.HyperAlign(hyperalign.HyperConfig.preset("toy-sd", variant="I"), pipe.backbone)
    seen = []

    def keep_gradient(module, args, out):                             # the training forward's M, not the rollout's
        if out.requires_grad:
            out.register_hook(seen.append)
    hook = ha.hypernet.decoder.register_forward_hook(keep_gradient)
    try:
        losses.training_step(ha, pipe, reward, prompts, None, 0.0, torch.Generator().manual_seed(seed))
    finally:
        hook.remove()
    g = -seen[0].flatten(1).double() * len(prompts)                    # d r_i / d M_i: the loss is −mean r
    left = torch.tensor([relation(p) == "left of" for p in prompts])
    mean_l, mean_r = g[left].mean(0), g[~left].mean(0)
    spread = torch.cat([g[left] - mean_l, g[~left] - mean_r]).norm(dim=1)
    differ, share = (mean_l - mean_r) / 2, (mean_l + mean_r) / 2
    return {"cos": torch.nn.functional.cosine_similarity(mean_l, mean_r, dim=0).item(),
            "differ": differ.norm().item(), "share": share.norm().item(), "sample_spread": spread.mean().item(),
            "differ_over_batch4_noise": (differ.norm() / (spread.square().mean().sqrt() / 2)).item()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--json", default="docs/results/probe-adaptive.json")
    p.add_argument("--tasks", default="same,opposite", help="comma-separated: same (the positive control), opposite")
    p.add_argument("--methods", default=f"HyperAlign-I,static LoRA,{ORACLE}",
                   help="comma-separated; NAME@LR sets the learning rate (HyperAlign-V: 1e-4, the others: 3e-4)")
    p.add_argument("--batch-size", type=int, default=4, help="samples per training step")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank R (HyperAlign's LoRA has rank 2R; default: "
                   "the preset's, 4)")
    p.add_argument("--head-gain", type=float, default=hyperalign.HEAD_GAIN, help="the decoder head's initial scale")
    p.add_argument("--keep", default=None, help="keep the HyperAlign and static runs in this folder")
    p.add_argument("--in-sample", action="store_true", help="score on 56 of the training prompts too")
    p.add_argument("--tag", default=None, help="a fix tried, recorded in every row (e.g. by probe_centre.py)")
    p.add_argument("--gradients", action="store_true", help="measure the reward's gradient at initialisation instead")
    a = p.parse_args(argv)
    default_gain = hyperalign.HEAD_GAIN
    hyperalign.HEAD_GAIN = a.head_gain                         # read when a hypernetwork is built
    for method in a.methods.split(","):
        name = method.partition("@")[0]
        if name not in ("HyperAlign-I", "HyperAlign-P", "HyperAlign-S", "static LoRA", ORACLE):
            p.error(f"--methods: unknown method {method!r}")
    base_cfg = config.RunConfig(lambda_reg=0.0, steps=a.steps, no_eval=True, variant="I", batch_size=a.batch_size,
                                rank=a.rank)
    pipe = config.load_pipeline(base_cfg)
    train_prompts, val = split("hyper-train"), split("val")
    by_relation = {r.strip(): [q for q in train_prompts if r in q] for r in RELATIONS}
    in_sample = train_prompts[::len(train_prompts) // len(val)][:len(val)]
    if a.gradients:
        batch = by_relation["left of"][:32] + by_relation["right of"][:32]
        rows = [{"task": task, "seed": seed, **gradients(pipe, colour_reward(task), batch, seed)}
                for seed in [int(s) for s in a.seeds.split(",")] for task in a.tasks.split(",")]
        for row in rows:
            print(json.dumps(row))
        files.write_json(a.json, {"what": "the L_R gradient with respect to each sample's core M at initialisation "
                                          "(64 training prompts, 32 per relation)", "rows": rows})
        print(f"wrote {a.json}")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for task in a.tasks.split(","):
                reward = colour_reward(task)
                for method in a.methods.split(","):
                    t0 = time.time()
                    name, _, lr = method.partition("@")
                    keep = a.keep and os.path.join(a.keep, f"{task}-{method}-b{a.batch_size}-g{a.head_gain:g}-"
                                                   f"r{a.rank or 4}-{a.steps}-s{seed}".replace(" ", "-")
                                                   .replace("@", "-lr"))
                    if name.startswith("HyperAlign-"):          # "HyperAlign-I", "HyperAlign-S@0.0003": variant, lr
                        cfg = replace(base_cfg, seed=seed, lr=float(lr or 1e-4), variant=name[-1])
                        m = train("hyperalign", cfg, train_prompts, pipe, reward, tmp, keep)
                        make = lambda cond, prompts: m.sampler_model(cond, pipe.steps)  # noqa: E731
                    elif name == "static LoRA":
                        cfg = replace(base_cfg, seed=seed, lr=float(lr or 3e-4))
                        m = train("static", cfg, train_prompts, pipe, reward, tmp, keep)
                        make = lambda cond, prompts: m.sampler_model(cond, pipe.steps)  # noqa: E731
                    else:
                        loras = {r: train("static", replace(base_cfg, seed=seed, lr=float(lr or 3e-4),
                                                            steps=a.steps // 2), qs, pipe, reward, tmp)
                                 for r, qs in by_relation.items()}
                        m = methods.Oracle(loras, relation, pipe.backbone)
                        make = lambda cond, prompts: m.sampler_model(cond, pipe.steps, prompts)  # noqa: E731
                    row = {"task": task, "method": method, "seed": seed, "steps": a.steps,
                           **({"batch_size": a.batch_size} if a.batch_size != 4 else {}),
                           **({"rank": a.rank} if a.rank else {}),
                           **({"head_gain": a.head_gain} if a.head_gain != default_gain else {}),
                           **({"fix": a.tag} if a.tag else {}),
                           "gain": gains(pipe, make, reward, val, seed)}
                    if a.in_sample:
                        row["gain_in_sample"] = gains(pipe, make, reward, in_sample, seed)
                    row["seconds"] = round(time.time() - t0, 1)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    out = {"what": __doc__.split("\n")[0], "train_prompts": len(train_prompts), "val_prompts": len(val),
           "rows": rows}
    files.write_json(a.json, out)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
