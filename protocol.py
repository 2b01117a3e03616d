"""The toy protocol behind `python evaluate.py` (docs/results.md): its rows, how each is trained and scored, and the
settings search on 'val'.

  * settings: train.py's and baselines.py's defaults, chosen on the 'val' split, never on a reported one (`search`);
    every trained row trains for the same number of steps;
  * every trained row is trained once per training seed (default 0, 1, 2), each seed its own run folder;
  * every row is scored on every 'unseen' prompt x sample seeds (default 4) and every 'heldout' prompt x 1, from the
    same x_T for every row, so that rows are compared sample by sample;
  * one JSON per row (docs/results/MODEL/ROW.json): the figures of every training seed. `python results.py` turns
    them into the tables (mean and 95% t-interval over training seeds).

Rows: base; HyperAlign-S / -I / -P; the static LoRA (the same loss and training step: DRaFT-1-like); Best-of-N; plain
gradient guidance (FreeDoM-like, no time travel); Direct-Align + SRPO's relative reward (toy FLUX); on toy SD the
loss ablation (L_R only, L_G only) and reward hacking (the toy-clip reward with and without L_G); and the adaptivity
ablation: HyperAlign-S / -I's own runs with every generated LoRA replaced by their mean (diagnostics.Averaged), which
keeps what the hypernetwork learned and removes only its dependence on the input. Columns: every reward, the judge
(overall and per attribute), saturation, diversity, adaptivity, seconds per image.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

import config
import diagnostics
import files
import methods
import rundir
import runs
import scoring
import testtime
from config import RunConfig
from toy import judge as toy_judge
from toy import world


@dataclass
class Protocol:
    """Where the protocol writes and how much it samples (evaluate.py's flags)."""
    out: str = "runs/table"                    # run folders of the trained rows (reused when finished)
    results: str = "docs/results"              # the JSON of every row, search.json, budget.json
    train_seeds: tuple[int, ...] = (0, 1, 2)
    sample_seeds: int = 4                      # samples per 'unseen' prompt
    heldout_seeds: int = 1                     # samples per 'heldout' prompt (0: skip the set)
    n_prompts: int | None = None               # prompts per set (None: all)
    search_part: tuple[int, int] = (0, 1)      # K/N: this process's share of the search grid
    budget: tuple[int, ...] = ()               # step counts of --budget


SCORE = "toy-comp,toy-ir,toy-pref,toy-clip"   # the reward columns of the toy tables (the first trains every row)


@dataclass
class Row:
    name: str
    kind: str        # "base", "hyperalign", "static", "oracle", "averaged", "best-of-n", "guidance", "eps-greedy", "freedom"
    over: dict = field(default_factory=dict)   # RunConfig settings over the defaults (trained rows)
    models: tuple[str, ...] = ("toy-sd", "toy-flux")
    of: str = ""                               # "averaged": the slug of the HyperAlign row whose runs it averages
    samples: tuple[int, int] | None = None     # (unseen, heldout) samples per prompt, where not the protocol's

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


ROWS = [
    Row("base", "base"),
    Row("HyperAlign-S", "hyperalign", {"variant": "S"}),
    Row("HyperAlign-I", "hyperalign", {"variant": "I"}),
    Row("HyperAlign-P", "hyperalign", {"variant": "P"}),
    Row("static LoRA", "static"),
    Row("Best-of-8", "best-of-n", {"n": 8}),
    Row("guidance", "guidance", {"rho": config.GUIDANCE_RHO}),
    Row("Direct-Align + SRPO reward", "static", {"reward_mode": "direct-align", "reward_from": 0.0, "lambda_reg": 0.0,
                                                "reward": "rel-toy-comp"}, ("toy-flux",)),
    Row("ablation: L_R only (λ = 0)", "hyperalign", {"lambda_reg": 0.0}, ("toy-sd",)),
    Row("ablation: L_G only", "hyperalign", {"reward": "toy-comp=0"}, ("toy-sd",)),
    Row("toy-clip reward, no L_G", "hyperalign", {"reward": "toy-clip", "lambda_reg": 0.0}, ("toy-sd",)),
    Row("toy-clip reward, with L_G", "hyperalign", {"reward": "toy-clip"}, ("toy-sd",)),
    Row("HyperAlign-S, LoRA averaged", "averaged", {"variant": "S"}, of="hyperalign-s"),
    Row("HyperAlign-I, LoRA averaged", "averaged", {"variant": "I"}, of="hyperalign-i"),
    # the paper's other baselines (finetune.py, testtime.py): the same LoRA with its authors' losses; test-time search
    Row("Diffusion-DPO", "static", {"objective": "dpo", "lambda_reg": 0.0}, ("toy-sd",)),
    Row("Diffusion-KTO", "static", {"objective": "kto", "lambda_reg": 0.0}, ("toy-sd",)),
    Row("GRPO", "static", {"objective": "grpo", "lambda_reg": 0.0}),
    Row("ε-greedy search (N 4, K 2)", "eps-greedy", {"n": 4, "k": 2}, ("toy-sd",), samples=(1, 0)),
    Row("FreeDoM", "freedom", {}, ("toy-sd",)),
    # can adapting pay? one static LoRA per prompt group, picked by an oracle reading the prompt (methods.Oracle)
    Row("oracle: a LoRA per relation", "oracle", {"group": "relation"}, ("toy-sd",)),
    Row("oracle: a LoRA per shape set", "oracle", {"group": "shapes"}, ("toy-sd",)),
    # ... at other ranks (HyperAlign's generated LoRA has rank 2R at --rank R: the static LoRA at R and at 2R)
    *[Row(f"static LoRA, rank {r}", "static", {"rank": r}, ("toy-sd",)) for r in (1, 2, 8, 16, 32)],
    *[Row(f"oracle: a LoRA per relation, rank {r}", "oracle", {"group": "relation", "rank": r},
          ("toy-sd",)) for r in (1, 16)],
    *[Row(f"HyperAlign-I, rank {r}", "hyperalign", {"variant": "I", "rank": r}, ("toy-sd",)) for r in (1, 16)],
]
PROBE = (64, (1000, 1001))     # "averaged": the LoRAs of 64 'unseen' prompts (a fixed random sample) x these seeds


# ------------------------------------------------------------------------------------------------------------- rows

def oracle_gen(pipe, oracle) -> Callable:
    """A generator for methods.Oracle: each sample with its prompt group's LoRA."""
    def generate(prompts, x_T, seed):
        cond, uncond = pipe.conds(prompts)
        return pipe.decode(pipe.rollout(oracle.sampler_model(cond, pipe.steps, prompts), x_T, cond, uncond,
                                        trajectory=False))
    return generate


def oracle(row: Row, cfg: RunConfig, pipe, rewards: "Rewards", reuse_only: bool = False):
    """Train (or reuse) one static LoRA per group of cfg.prompts (row.over["group"]), each on its group's prompts for
    its share of cfg.steps (the group's share of the prompts: together the budget of one shared LoRA, and every
    prompt seen as often as by it); -> (methods.Oracle, seconds)."""
    grouping, prompts, loras, t0 = row.over["group"], config.read_prompts(cfg.prompts), {}, time.time()
    for value in sorted({world.group(q, grouping) for q in prompts}):
        share = sum(world.group(q, grouping) == value for q in prompts) / len(prompts)
        gcfg = replace(cfg, prompts=f"{cfg.prompts}@{grouping}={value}", steps=max(1, round(cfg.steps * share)),
                       out=os.path.join(cfg.out, re.sub(r"[^a-z0-9+]+", "-", value)))
        given = dict(pipe=pipe, reward=rewards(gcfg.reward),
                     prefs_reader=config.load_prefs(gcfg, config.read_prompts(gcfg.prompts), []))
        loras[value] = trained("static", gcfg, reuse_only, **given)[0]
    return methods.Oracle(loras, lambda q: world.group(q, grouping), pipe.backbone), time.time() - t0


def search_gen(pipe, reward, over: dict) -> Callable:
    """ε-greedy noise search (testtime.epsilon_greedy), its noise seeded from the batch's seed."""
    return lambda prompts, x_T, seed: pipe.decode(testtime.epsilon_greedy(
        pipe, reward, prompts, x_T, generator=torch.Generator().manual_seed(2_000_000 + seed), **over))


def freedom_gen(pipe, reward) -> Callable:
    """FreeDoM as published (testtime.freedom), its DDPM noise seeded from the batch's seed."""
    return lambda prompts, x_T, seed: pipe.decode(testtime.freedom(
        pipe, reward, prompts, x_T, generator=torch.Generator().manual_seed(3_000_000 + seed)))


def best_of_n_gen(pipe, reward, n: int) -> Callable:
    """Candidate 0 is the row's own x_T (so BoN is never worse than base on the reward); the others from seed."""
    def generate(prompts, x_T, seed):
        g = torch.Generator().manual_seed(1_000_000 + seed)
        xs = torch.stack([x_T] + [pipe.noise(len(prompts), g) for _ in range(n - 1)])
        return testtime.best_of_n(pipe, reward, prompts, xs)[0]
    return generate


def guidance_gen(pipe, reward, rho: float) -> Callable:
    return lambda prompts, x_T, seed: pipe.decode(testtime.guidance_sample(pipe, reward, prompts, x_T, rho))


def trained(kind: str, cfg: RunConfig, reuse_only: bool = False, **given):
    """Train a run (runs.train) unless cfg.out already holds it finished with these settings; then load it.
    `reuse_only` (timing): load the finished run in cfg.out whatever its settings, train nothing."""
    if reuse_only:
        method, saved = runs.load_trained(cfg.out, given["pipe"].backbone)
        if saved["step"] != cfg.steps:
            raise rundir.RunError(f"{cfg.out}: trained {saved['step']} of {cfg.steps} steps")
        return method, 0.0
    done = False
    if os.path.isfile(os.path.join(cfg.out, rundir.POINTER)):
        try:
            rundir.check_resume(cfg.out, cfg, kind)
            done = rundir.load(cfg.out)[2] == cfg.steps
        except ValueError as e:                               # said, never silent: it replaces the run
            print(f"{cfg.out}: not reused, training it again ({e})", flush=True)
    t0 = time.time()
    if not done:
        runs.train(methods.builder(kind, cfg), cfg, overwrite=True, **given)
    return runs.load_trained(cfg.out, given["pipe"].backbone)[0], time.time() - t0


# -------------------------------------------------------------------------------------------------------- protocol

class Rewards:
    """Reward models by spec, loaded once."""
    def __init__(self):
        self.cache = {}

    def __call__(self, spec: str):
        if spec not in self.cache:
            self.cache[spec] = config.load_reward(spec)
        return self.cache[spec]


def score_row(generate: Callable, pipe, p: "Protocol", score, embed, desc: str,
              samples: tuple[int, int] | None = None) -> dict:
    """A row's figures on the protocol's sets: every 'unseen' prompt x sample seeds, every 'heldout' prompt x 1
    (`samples`: other counts, for a row too slow for the whole protocol)."""
    out = {}
    for split, seeds in zip(("unseen", "heldout"), samples or (p.sample_seeds, p.heldout_seeds)):
        if seeds:
            ps = world.eval_prompts(split, p.n_prompts)
            out[split] = scoring.measure(generate, pipe, ps, list(range(seeds)), score, toy_judge.judge, embed,
                                         desc=f"{desc} {split}")[0]
    return out


UNTRAINED = ("base", "best-of-n", "guidance", "eps-greedy", "freedom")


def row_config(row: Row, model: str, p: "Protocol", seed: int) -> RunConfig:
    """The run config of a trained row for one training seed (its run folder under p.out)."""
    over = {**(config.static(model) if row.kind in ("static", "oracle") else {}),     # the static LoRA's own lr
            **{k: v for k, v in row.over.items() if k != "group"}}
    base = RunConfig.from_preset(model, out="", no_eval=True, save_every=10_000, threads=torch.get_num_threads())
    return replace(base, **over, seed=seed, out=os.path.join(p.out, model, f"{row.of or row.slug}-s{seed}"))


def generator(row: Row, model: str, pipe, rewards: Rewards, cfg: RunConfig | None = None,
              reuse_only: bool = False) -> tuple[Callable, object, float]:
    """A row's `generate(prompts, x_T, seed) -> images` (scoring.measure), the method behind it and its training
    seconds: a test-time row from the training reward; a trained row from its run folder cfg.out, trained there
    first unless it holds the finished run (`reuse_only`: the finished run as it is, nothing trained)."""
    if row.kind in UNTRAINED:
        reward = rewards(RunConfig.from_preset(model).reward)
        return {"base": lambda: scoring.sampler(pipe, lambda c: pipe.backbone),
                "best-of-n": lambda: best_of_n_gen(pipe, reward, row.over.get("n", 8)),
                "guidance": lambda: guidance_gen(pipe, reward, row.over.get("rho", 1.0)),
                "eps-greedy": lambda: search_gen(pipe, reward, row.over),
                "freedom": lambda: freedom_gen(pipe, reward)}[row.kind](), None, 0.0
    if row.kind == "oracle":
        method, train_s = oracle(row, cfg, pipe, rewards, reuse_only)
        return oracle_gen(pipe, method), method, train_s
    given = dict(pipe=pipe, reward=rewards(cfg.reward),
                 prefs_reader=config.load_prefs(cfg, config.read_prompts(cfg.prompts), []))
    method, train_s = trained("hyperalign" if row.kind == "averaged" else row.kind, cfg, reuse_only, **given)
    if row.kind == "averaged":
        n, probe_seeds = PROBE
        method = diagnostics.Averaged(method, pipe, world.eval_prompts("unseen", n, seed=7), list(probe_seeds))
    return scoring.sampler(pipe, lambda c, m=method: m.sampler_model(c, pipe.steps)), method, train_s


def run_row(row: Row, model: str, pipe, p: "Protocol", rewards: Rewards) -> dict:
    """Train (every training seed) and score one row; -> the JSON that results.py reads."""
    score = rewards(SCORE)
    embed = scoring.clip_embedder(score)
    record = {"model": model, "row": row.name, "kind": row.kind, "protocol": {
        "unseen": f"{len(world.eval_prompts('unseen', p.n_prompts))} prompts x {p.sample_seeds} sample seeds",
        "heldout": f"{len(world.eval_prompts('heldout', p.n_prompts))} prompts x {p.heldout_seeds}",
        "score": SCORE}, "seeds": {}}
    if row.kind in UNTRAINED:                                                       # nothing trained: one entry
        record["settings"] = {"reward": RunConfig.from_preset(model).reward, **row.over}
        record["seeds"]["-"] = score_row(generator(row, model, pipe, rewards)[0], pipe, p, score, embed, row.name,
                                         row.samples)
        if row.samples:
            record["protocol"]["unseen"] = f"{record['protocol']['unseen'].split(' x ')[0]} x {row.samples[0]}"
        return record
    for seed in p.train_seeds:
        cfg = row_config(row, model, p, seed)
        record["settings"] = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "out")}
        if row.kind == "oracle":
            record["settings"]["group"] = row.over["group"]
        if row.kind == "averaged":
            n, probe_seeds = PROBE
            record["settings"]["averaged_over"] = f"{n} 'unseen' prompts (random) x seeds {list(probe_seeds)}"
        generate, method, train_s = generator(row, model, pipe, rewards, cfg)
        figures = score_row(generate, pipe, p, score, embed, f"{row.name} s{seed}")
        if row.kind not in ("averaged", "oracle"):
            figures["adaptivity"] = runs.adaptivity(method, pipe, world.eval_prompts("unseen", None))
            figures["train_s"] = round(train_s, 1)
        record["seeds"][str(seed)] = figures
    return record


# ---------------------------------------------------------------------------------------------------------- search

# Toy world v2's search, in two stages (the grids: where L_R is taken, then the learning rate). History: v1's searches
# (search-first.json, search-clamped.json) preferred one-step L_R to direct-align in 7 of 8 pairs and λ = 1 to λ = 3 in
# 6 of 8; λ stays 1. v1's reward could not see positions, and L_R from the later half only (reward_from 0.5) was taken
# after the layout is fixed: v2 searches it.
SEARCH_WHERE = [("one-step", 0.0), ("one-step", 0.25), ("one-step", 0.5), ("direct-align", 0.0)]
SEARCH_LR = [3e-5, 1e-4, 3e-4, 1e-3]


class Val:
    """What the search and --budget train and score on: a toy model's pipeline (toy SD unless named), the score
    rewards, the 'val' prompts, the reward the settings are chosen by (the training reward) and the base run config
    (no evaluation, one final checkpoint)."""
    def __init__(self, rewards: Rewards, model: str = "toy-sd"):
        self.rewards, self.pipe = rewards, config.load_pipeline(RunConfig.from_preset(model))
        self.score, self.val, self.key = rewards(SCORE), world.prompts("val"), "reward/" + SCORE.split(",")[0]
        self.base_cfg = RunConfig.from_preset(model, no_eval=True, save_every=10_000,
                                              threads=torch.get_num_threads())

    def base(self) -> dict:
        """The base model's val scores (every 'val' prompt x 2 samples)."""
        return scoring.measure(scoring.sampler(self.pipe, lambda c: self.pipe.backbone), self.pipe, self.val, [0, 1],
                               self.score, toy_judge.judge, desc="val base")[0]

    def figures(self, m: dict) -> dict:
        """What a search row records of val scores `m`: the choosing reward and the judge's parts."""
        return {"reward": m[self.key], "judge": m["judge/overall"], "position": m["judge/position"],
                "binding": m["judge/binding"]}


def best(rows: list[dict], base: dict) -> dict:
    """The search's rule: the highest val reward among `rows` whose val judge is not below the base model's (all
    rows, if none is)."""
    return max([r for r in rows if r["judge"] >= base["judge/overall"]] or rows, key=lambda r: r["reward"])


def on_val(kind: str, cfg: RunConfig, v: Val) -> dict:
    """A run trained (or reused, `trained`) with `cfg`, scored on every 'val' prompt x 2 samples (kept in the run
    folder's val.json): its "method" row name, val "reward" and "judge", and for HyperAlign its "adaptivity" at x_T
    over 16 'val' prompts x 4 seeds (0 for the static LoRA)."""
    given = dict(pipe=v.pipe, reward=v.rewards(cfg.reward),
                 prefs_reader=config.load_prefs(cfg, config.read_prompts(cfg.prompts), []))
    method, _ = trained(kind, cfg, **given)
    m = scored_once(os.path.join(cfg.out, "val.json"), lambda: scoring.measure(
        scoring.sampler(v.pipe, lambda c: method.sampler_model(c, v.pipe.steps)), v.pipe, v.val, [0, 1], v.score,
        toy_judge.judge, desc=f"val {kind}")[0])
    return {"method": "HyperAlign-I" if kind == "hyperalign" else "static LoRA", **v.figures(m),
            "adaptivity": runs.adaptivity(method, v.pipe, v.val)["x_T"] if kind == "hyperalign" else 0.0}


def scored_once(path: str, measure: Callable[[], dict]) -> dict:
    """A search setting's val scores: read from `path` if that setting was scored before, else measured and kept."""
    if os.path.isfile(path):
        return files.read_json(path, "search score")
    m = measure()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, {k: v for k, v in m.items() if not isinstance(v, (list, dict))})
    return m


def search(p: "Protocol", rewards: Rewards) -> dict:
    """The settings of the tables, chosen on the 'val' split (never on a reported one), training seed 0, each setting
    scored on every 'val' prompt x 2 samples (and each HyperAlign run's adaptivity at x_T, recorded, not used):

      1. where L_R is taken (SEARCH_WHERE: one-step from 0, 0.25 or 0.5 of the way, or direct-align from 0), for
         HyperAlign-I and the static LoRA at their present learning rates; chosen by HyperAlign-I's;
      2. the learning rate (SEARCH_LR) of each method at that setting;
    per choice the highest val reward among the settings whose val judge is not below the base model's (all
    settings, if none); guidance's step ρ the same way. -> search.json. With --search-part K/N, processes train and
    score disjoint parts of the grid that can be run now (stage 2 once stage 1 is scored) and return."""
    v = Val(rewards)
    pipe, score, val, key, base_cfg = v.pipe, v.score, v.val, v.key, v.base_cfg
    base = v.base()
    lrs = {"hyperalign": base_cfg.lr, "static": config.static("toy-sd")["lr"]}
    part, parts = p.search_part

    def folder(kind, mode, frm, lr):
        return os.path.join(p.out, "search", f"{kind}-{mode}-{frm:g}-{lr:g}")

    grid1 = [(kind, mode, frm, lrs[kind]) for kind in lrs for mode, frm in SEARCH_WHERE]
    done1 = all(os.path.isfile(os.path.join(folder(*g), "val.json")) for g in grid1)
    out, todo = [], list(grid1)
    if done1 or parts == 1:
        rows1 = [dict(on_val(g[0], replace(base_cfg, reward_mode=g[1], reward_from=g[2], lr=g[3], out=folder(*g)), v),
                      setting={"reward_mode": g[1], "reward_from": g[2], "lr": g[3]}) for g in grid1]
        mode, frm = (lambda r: (r["setting"]["reward_mode"], r["setting"]["reward_from"]))(
            best([r for r in rows1 if r["method"] == "HyperAlign-I"], base))
        todo = [(kind, mode, frm, lr) for kind in lrs for lr in SEARCH_LR]
    for i, (kind, mode, frm, lr) in enumerate(todo):
        if parts > 1 and i % parts != part:
            continue
        over = dict(reward_mode=mode, reward_from=frm, lr=lr)
        fig = on_val(kind, replace(base_cfg, **over, out=folder(kind, mode, frm, lr)), v)
        out.append({"method": fig.pop("method"), "setting": over, **fig})
        print(out[-1], flush=True)
    if parts > 1:
        return {"chosen": f"part {part} of {parts} of stage {2 if done1 else 1} done; run again (stage 2), then "
                          "--search without --search-part to choose"}
    for r in rows1:
        r["stage"] = 1
    for r in out:
        r["stage"] = 2
    found = {"where": {"reward_mode": mode, "reward_from": frm}}
    for method in ("HyperAlign-I", "static LoRA"):
        pick = best([r for r in out if r["method"] == method], base)
        pick["chosen"] = True
        found[method] = pick["setting"]
    guidance = []
    for rho in (0.3, 1.0, 3.0):
        m = scored_once(os.path.join(p.out, "search", f"guidance-{rho:g}", "val.json"), lambda: scoring.measure(
            guidance_gen(pipe, rewards(base_cfg.reward), rho), pipe, val, [0], score, toy_judge.judge,
            desc=f"val guidance {rho}")[0])
        guidance.append({"method": "guidance", "setting": {"rho": rho}, **v.figures(m), "stage": 2})
    pick = best(guidance, base)
    pick["chosen"] = True
    found["guidance"] = pick["setting"]
    record = {"split": f"val: {len(val)} prompts x 2 samples (guidance x 1), training seed 0",
              "reward": key.split("/")[1], "base": v.figures(base), "runs": rows1 + out + guidance, "chosen": found}
    os.makedirs(p.results, exist_ok=True)
    files.write_json(os.path.join(p.results, "search.json"), record)
    return record


def lr_search(p: "Protocol", rewards: Rewards, model: str) -> dict:
    """Stage 2 of `search` on another toy model: each method's learning rate (SEARCH_LR) where toy SD's search takes
    L_R, training seed 0, every 'val' prompt x 2 samples, chosen by the same rule. -> search-MODEL.json. The chosen
    rates are what the tables of that model then use (config.py)."""
    v = Val(rewards, model)
    base = v.base()
    part, parts = p.search_part
    grid, out = [(kind, lr) for kind in ("hyperalign", "static") for lr in SEARCH_LR], []
    for i, (kind, lr) in enumerate(grid):
        if parts > 1 and i % parts != part:
            continue
        cfg = replace(v.base_cfg, lr=lr, out=os.path.join(p.out, f"search-{model}", f"{kind}-{lr:g}"))
        fig = on_val(kind, cfg, v)
        out.append({"method": fig.pop("method"), "setting": {"reward_mode": cfg.reward_mode,
                                                             "reward_from": cfg.reward_from, "lr": lr},
                    "stage": 2, **fig})
        print(out[-1], flush=True)
    if parts > 1:
        return {"chosen": f"part {part} of {parts} done; then --search without --search-part to choose"}
    found = {}
    for method in ("HyperAlign-I", "static LoRA"):
        pick = best([r for r in out if r["method"] == method], base)
        pick["chosen"] = True
        found[method] = pick["setting"]
    record = {"split": f"val: {len(v.val)} prompts x 2 samples, training seed 0, {model}",
              "reward": v.key.split("/")[1], "base": v.figures(base), "runs": out, "chosen": found}
    files.write_json(os.path.join(p.results, f"search-{model}.json"), record)
    return record


def budget(p: "Protocol", rewards: Rewards) -> dict:
    """Does HyperAlign's LoRA adapt more with a longer budget? HyperAlign-I and the static LoRA at their chosen settings
    (training seed 0), trained for every --budget step count, each scored on every 'val' prompt x 2 samples as in the
    search, with the adaptivity at x_T. -> budget.json."""
    v, out = Val(rewards), []
    for steps in p.budget:
        for kind, over in (("hyperalign", {}), ("static", config.static("toy-sd"))):
            cfg = replace(v.base_cfg, **over, steps=steps, out=os.path.join(p.out, "budget", f"{kind}-{steps}"))
            fig = on_val(kind, cfg, v)
            out.append({"method": fig.pop("method"), "steps": steps, "lr": cfg.lr, **fig})
            print(out[-1], flush=True)
    record = {"split": f"val: {len(v.val)} prompts x 2 samples, training seed 0", "reward": v.key.split("/")[1],
              "runs": out}
    files.write_json(os.path.join(p.results, "budget.json"), record)
    return record
