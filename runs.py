"""The training of a run, shared by train.py (HyperAlign) and baselines.py (the static LoRA): load and check every
input, start the run folder (rundir.py) or resume it, fit, evaluate against the base model, report.

    train(build, cfg, resume, overwrite)   the whole run: load_inputs -> start_or_resume -> fit -> report
    load_trained(out, backbone)            rebuild a trained method from its run folder (sample.py, evaluate.py, ...)
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

import config
import distributed
import files
import finetune
import hyperalign
import losses
import methods
import prefs
import rundir
import scoring
from backbone import Backbone
from config import RunConfig
from rundir import RunError
from toy import judge as toy_judge
from weights import check_state_dict


def load_trained(out: str, backbone, device=None):
    """Rebuild a trained method from its run folder on a frozen backbone: (HyperAlign or methods.StaticLoRA, the
    saved config). The architecture, variant and P's key steps come from config.json; weights are loaded strictly."""
    if not os.path.isdir(out):
        raise RunError(f"no such run folder: {out}")
    saved = rundir.read_config(out)
    try:
        hcfg = hyperalign.HyperConfig(**saved["hyper"])
        kind = saved["method"]
    except (KeyError, TypeError) as e:
        raise RunError(f"{os.path.join(out, rundir.CONFIG)}: not a run config ({e})") from None
    if kind not in methods.METHODS:
        raise RunError(f"{os.path.join(out, rundir.CONFIG)}: unknown method {kind!r}")
    method = methods.METHODS[kind](hcfg, backbone)
    weights, _, step = rundir.load(out)
    check_state_dict(method.trainable, weights, f"{out} (trained for another model?)")
    method.trainable.load_state_dict(weights, strict=True)
    saved["step"] = step
    return (method.to(device) if device is not None else method), saved


# --------------------------------------------------------------------------------------------------------- training

def step_generator(seed: int, step: int) -> torch.Generator:
    """All randomness of training step `step` comes from here: a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def fit(method, module: torch.nn.Module, opt: torch.optim.Optimizer, pipe, reward, prompts: list[str],
        prefs_reader, cfg: RunConfig, step: int, ctx: distributed.Context = distributed.Context(),
        desc: str = "train") -> int:
    """Train `module` (the trainable part of `method`) from `step` to cfg.steps with losses.training_step (or, for a
    baseline's cfg.objective, finetune.step), checkpointing into cfg.out. Non-finite values stop it before the
    optimiser step (the last good checkpoint stays). Returns the number of steps run."""
    net = distributed.wrap(module, ctx, pipe.device)  # DDP over the trainable part only; the frozen models are not
    pairs = cfg.objective in ("dpo", "kto")           # DPO and KTO learn from both images of a preference pair
    pref_iter = (prefs.stream(prefs_reader, cfg.batch_size, pipe.resolution, step, ctx, rejected=pairs)
                 if prefs_reader is not None and (cfg.lambda_reg > 0 or pairs) else None)
    log_path = os.path.join(cfg.out, rundir.LOG)
    if ctx.main and os.path.exists(log_path):     # a resumed run drops the lines after its checkpoint
        with open(log_path, encoding="utf-8") as f:
            kept = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
        files.write_text(log_path, "".join(kept))
    first = step
    bar = tqdm(range(step, cfg.steps), initial=step, total=cfg.steps, desc=desc, disable=not ctx.main)
    G = ctx.world * cfg.batch_size                # the global batch: every rank draws it, each takes its rows
    for step in bar:
        gen = step_generator(cfg.seed, step)
        batch = [prompts[i] for i in torch.randint(0, len(prompts), (G,), generator=gen).tolist()]
        opt.zero_grad(set_to_none=True)
        t0 = time.time()
        try:
            pref = next(pref_iter) if pref_iter else None
            if cfg.objective == "hyperalign":
                log = losses.training_step(method, pipe, reward, batch, pref, cfg.lambda_reg, gen, cfg.reward_from,
                                           cfg.reward_mode, ctx.rows(cfg.batch_size), net)
            else:
                log = finetune.step(cfg, method, pipe, reward, batch[ctx.rows(cfg.batch_size)], pref, gen, net)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"gradient norm is {grad_norm.item()}")
            opt.step()
            bad = rundir.non_finite(module.named_parameters())
            if bad:
                raise FloatingPointError(f"parameters {', '.join(bad[:3])} became non-finite")
        except FloatingPointError as e:
            raise SystemExit(f"error: non-finite values at step {step + 1} ({e}); stopped, the last good checkpoint "
                             f"is kept in {cfg.out}") from None
        log = distributed.mean({**log, "grad_norm": grad_norm.item()}, ctx)
        log.update(step=step + 1, sec=round(time.time() - t0, 3))
        if not ctx.main:                          # rank 0 alone logs and checkpoints
            continue
        files.append_line(log_path, json.dumps(log))
        bar.set_postfix(loss=f"{log['loss']:.4f}", reward=f"{log['reward']:.4f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            rundir.save(cfg.out, step + 1, module, opt)
    return cfg.steps - first



# ------------------------------------------------------------------------------------------------------- whole runs

def adaptivity(method, pipe, prompts: list[str], n_prompts: int = 16, seeds: int = 4) -> dict:
    """How much of Δθ lies between inputs (diagnostics.adaptivity): at x_T over prompts x seeds (and between prompts
    alone), and for S over every step of the trajectories too. 0 is a static LoRA."""
    import diagnostics
    ps = prompts[:n_prompts]
    at = diagnostics.at_x_T(method, pipe, ps, list(range(seeds)))
    out = {"x_T": at["adaptivity"], "prompts": at["adaptivity_prompts"], "pca_first": at["explained"][0].item(),
           "n": f"{len(ps)} prompts x {seeds} seeds"}
    if method.cfg.variant == "S":
        out["trajectory"] = diagnostics.along_trajectory(method, pipe, ps)["adaptivity"]
    return out


@dataclass
class Inputs:
    """Everything a run reads, loaded and checked before its folder is touched."""
    pipe: object
    prompts: list[str]
    sets: dict[str, list[str]]       # held-out prompt sets, scored at the end
    reward: object
    prefs_reader: object
    judge: object                    # the toy world's judge for toy prompt sets, else None
    ctx: distributed.Context
    device: torch.device


def load_inputs(cfg: RunConfig, resume: bool, overwrite: bool, pipe=None, reward=None, prefs_reader=None,
          judge=None) -> Inputs:
    """Threads, process group, --out checks, then every input of the run (the objects may be passed in: tests)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx, device = distributed.init(cfg.device)      # torchrun: join the group (gloo / nccl); else no group
    rundir.check_folder(cfg.out, resume, overwrite)  # refuse a used --out before loading or writing anything
    pipe = pipe or config.load_pipeline(cfg, device)
    prompts = config.read_prompts(cfg.prompts)
    sets = {} if cfg.no_eval else config.eval_sets(cfg)
    reward = reward or config.load_reward(cfg.reward, cfg.reward_tokenizer, device, cfg.reward_dtype)
    if prefs_reader is None and (cfg.lambda_reg > 0 or cfg.objective in ("dpo", "kto")):
        prefs_reader = config.load_prefs(cfg, prompts, [p for ps in sets.values() for p in ps])
        if next(iter(prefs_reader), None) is None:  # readers are lazy: read one pair now, before a file is touched
            raise RunError(f"--prefs {cfg.prefs}: no preference pair to train L_G on (after dropping held-out prompts)")
    if judge is None and sets and all(s.strip().startswith("toy:") for s in cfg.eval_prompts.split(",")):
        judge = toy_judge.judge                     # the toy world's ground truth, for toy prompts only
    pipe.backbone.model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.grad_ckpt:
        pipe.backbone.model.train()  # the U-Net checkpoints only in training mode (no dropout or batch norm in it)
    return Inputs(pipe, prompts, sets, reward, prefs_reader, judge, ctx, device)


def start_or_resume(kind: str, method, module: torch.nn.Module, opt, cfg: RunConfig, inp: Inputs, resume: bool,
          overwrite: bool, calibrate=None) -> int:
    """Resume the run in cfg.out (same settings, verified checkpoint) or start it (calibrate P, write config.json
    and the step-0 checkpoint). Returns the step training goes on from."""
    if resume:
        if inp.ctx.main:
            rundir.lock_folder(cfg.out, True, False)
        saved = rundir.check_resume(cfg.out, cfg, kind, inp.ctx.world)
        weights, optim, step = rundir.load(cfg.out)
        method.cfg.key_steps, method.cfg.key_of = tuple(saved["hyper"]["key_steps"]), saved["hyper"]["key_of"]
        module.load_state_dict(weights, strict=True)
        opt.load_state_dict(optim)
        if inp.ctx.main:
            print(f"resumed {cfg.out} at step {step}")
        return step
    if calibrate is not None:
        calibrate()
    if inp.ctx.main:
        rundir.create(cfg.out, overwrite, {"method": kind, "run": cfg.to_dict(), "hyper": method.cfg.to_dict(),
                                   "world": inp.ctx.world})
        rundir.save(cfg.out, 0, module, opt)
    return 0


def report(method, module: torch.nn.Module, cfg: RunConfig, inp: Inputs, name: str, times: dict) -> dict:
    """Score the trained method on every held-out set, write metrics.json and samples.png, print the summary."""
    distributed.close()
    metrics = {"method": name, "steps": cfg.steps, "seed": cfg.seed, "reward": cfg.reward,
               "key_steps": list(method.cfg.key_steps_for(inp.pipe.steps)) if method.cfg.variant == "P" else [],
               "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    if cfg.no_eval or not inp.ctx.main:
        return metrics
    t0 = time.time()
    metrics["adaptivity"] = adaptivity(method, inp.pipe, next(iter(inp.sets.values())))
    metrics["eval"], first = scoring.evaluate_sets(method, inp.pipe, inp.reward, inp.sets, cfg.eval_seeds, cfg.seed,
                                                   inp.judge, cfg.eval_batch)
    metrics["time_s"] = {**times, "evaluate": round(time.time() - t0, 1)}
    paths = scoring.write_results(cfg.out, metrics, first)
    print(f"\n{name}: {cfg.steps} steps in {times.get('train', 0):.0f} s, evaluated in "
          f"{metrics['time_s']['evaluate']:.0f} s (reward {cfg.reward}; change = aligned - base, same x_T)")
    print(scoring.summary(metrics["eval"], paths, metrics["adaptivity"]))
    return metrics


def train(build: Callable[[Backbone], nn.Module], cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          **given) -> dict:
    """A whole run per `cfg`, from loading to the summary, of the method `build(backbone)` makes on the loaded
    backbone: HyperAlign (train.py) or methods.StaticLoRA (baselines.py); its `kind` is what the run folder records.
    `given`: pipe, reward, prefs_reader, judge objects to use instead of loading them (tests, evaluate.py)."""
    t0 = time.time()
    inp = load_inputs(cfg, resume, overwrite, **given)
    method = build(inp.pipe.backbone).to(inp.device)
    kind, module = method.kind, method.trainable
    if kind == "hyperalign":
        name = f"HyperAlign-{method.cfg.variant}"
    else:
        name = {"dpo": "Diffusion-DPO", "kto": "Diffusion-KTO", "grpo": "GRPO"}.get(
            cfg.objective, "static LoRA" if cfg.reward_mode == "one-step" else "Direct-Align")
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.0)
    p_rule = (lambda: hyperalign.calibrate(method, inp.pipe, inp.prompts[:16], cfg.key_steps, cfg.seed, inp.ctx)) \
        if method.cfg.variant == "P" and kind == "hyperalign" else None
    try:
        step = start_or_resume(kind, method, module, opt, cfg, inp, resume, overwrite, p_rule)
        t1 = time.time()
        fit(method, module, opt, inp.pipe, inp.reward, inp.prompts, inp.prefs_reader, cfg, step, inp.ctx, name)
        return report(method, module, cfg, inp, name, {"setup": round(t1 - t0, 1),
                                                       "train": round(time.time() - t1, 1)})
    except KeyboardInterrupt as e:  # every file is written atomically: what is on disk is whole, say what is kept
        raise KeyboardInterrupt("; ".join(filter(None, (str(e), rundir.kept(cfg.out))))) from None
    except RuntimeError as e:
        if (stop := distributed.lost_peer(e, inp.ctx)) is None:
            raise
        raise KeyboardInterrupt("; ".join(filter(None, (str(stop), rundir.kept(cfg.out))))) from None
    finally:
        rundir.unlock_folder(cfg.out)
