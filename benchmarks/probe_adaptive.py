"""Can training make HyperAlign's LoRA depend on the prompt when the reward asks for it? A probe with a known answer.

The reward is colour, which every method here learns fast: r = s(prompt) * (mean red - mean blue) of the image, with
s = +1 for "left of" prompts and, in the "opposite" task, s = -1 for "right of" prompts ("same": +1 for both). In
"opposite" the best single LoRA gains nothing on average (what it adds to one group it takes from the other); a
LoRA per relation (the oracle, two static LoRAs trained on half the steps each, picked by reading the prompt) shows
what adapting is worth. HyperAlign-I sees the prompt and has to find that out itself. "same" is the positive
control: every method should gain there, so a zero in "opposite" is a statement about adapting, not about training.

    python benchmarks/probe_adaptive.py [--steps 150] [--seeds 0] [--json docs/results/probe-adaptive.json]
        [--tasks same,opposite] [--methods "HyperAlign-I,HyperAlign-S@0.0003,static LoRA,oracle: a LoRA per relation"]

Trains on the toy world's hyper-train prompts with "left of" / "right of", lambda_reg 0 (no L_G), the v2 search's
learning rates; scores on the val prompts with the same relations, aligned vs base from the same x_T.
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


def train(kind: str, cfg, prompts: list[str], pipe, reward, tmp: str):
    """One run on `prompts` (a file in tmp) -> the trained method."""
    path = os.path.join(tmp, f"{kind}-{len(prompts)}-{abs(hash(tuple(prompts)))}.txt")
    with open(path, "w") as f:
        f.write("\n".join(prompts))
    cfg = replace(cfg, prompts=path, out=os.path.join(tmp, os.path.basename(path)[:-4]))
    runs.train(kind, cfg, overwrite=True, pipe=pipe, reward=reward)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    p.add_argument("--json", default="docs/results/probe-adaptive.json")
    p.add_argument("--tasks", default="same,opposite", help="comma-separated: same (the positive control), opposite")
    p.add_argument("--methods", default=f"HyperAlign-I,static LoRA,{ORACLE}",
                   help="comma-separated; NAME@LR sets the learning rate (HyperAlign-V: 1e-4, the others: 3e-4)")
    a = p.parse_args(argv)
    for method in a.methods.split(","):
        name = method.partition("@")[0]
        if name not in ("HyperAlign-I", "HyperAlign-P", "HyperAlign-S", "static LoRA", ORACLE):
            p.error(f"--methods: unknown method {method!r}")
    base_cfg = config.RunConfig(lambda_reg=0.0, steps=a.steps, no_eval=True, variant="I")
    pipe = config.load_pipeline(base_cfg)
    train_prompts, val = split("hyper-train"), split("val")
    by_relation = {r.strip(): [q for q in train_prompts if r in q] for r in RELATIONS}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            for task in a.tasks.split(","):
                reward = colour_reward(task)
                for method in a.methods.split(","):
                    t0 = time.time()
                    name, _, lr = method.partition("@")
                    if name.startswith("HyperAlign-"):          # "HyperAlign-I", "HyperAlign-S@0.0003": variant, lr
                        cfg = replace(base_cfg, seed=seed, lr=float(lr or 1e-4), variant=name[-1])
                        m = train("hyperalign", cfg, train_prompts, pipe, reward, tmp)
                        make = lambda cond, prompts: m.sampler_model(cond, pipe.steps)  # noqa: E731
                    elif name == "static LoRA":
                        cfg = replace(base_cfg, seed=seed, lr=float(lr or 3e-4))
                        m = train("static", cfg, train_prompts, pipe, reward, tmp)
                        make = lambda cond, prompts: m.sampler_model(cond, pipe.steps)  # noqa: E731
                    else:
                        loras = {r: train("static", replace(base_cfg, seed=seed, lr=float(lr or 3e-4),
                                                            steps=a.steps // 2), qs, pipe, reward, tmp)
                                 for r, qs in by_relation.items()}
                        m = methods.Oracle(loras, relation, pipe.backbone)
                        make = lambda cond, prompts: m.sampler_model(cond, pipe.steps, prompts)  # noqa: E731
                    row = {"task": task, "method": method, "seed": seed, "steps": a.steps,
                           "gain": gains(pipe, make, reward, val, seed), "seconds": round(time.time() - t0, 1)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    out = {"what": __doc__.split("\n")[0], "train_prompts": len(train_prompts), "val_prompts": len(val),
           "rows": rows}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
