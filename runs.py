"""Run folders that cannot lose work, and the training loop train.py and baselines.py share.

    DIR/config.json        {"method", "run": RunConfig, "hyper": HyperConfig}, written when the run starts
    DIR/checkpoint.json    the pointer: {"step", "folder", "sha256": {file: digest}}, replaced atomically
    DIR/ckpt-000150/       weights.safetensors (trainable parameters, step in the metadata), optim.pt (AdamW state)
    DIR/metrics.jsonl      one line per training step
    DIR/metrics.json, samples.png   the evaluation at the end

One checkpoint is one step folder written in full (every file fsynced), then the pointer is swapped to it, then the
older step folders are removed: a kill or a full disk at any moment leaves the previous checkpoint whole and
pointed at. Loading checks the digests and the step, so a torn or edited set is refused, not half-loaded. A folder
that holds a run is never reused by accident: `--resume` continues it (with the same settings), `--overwrite`
replaces it, anything else is refused before a file is touched.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

import config
import distributed
import files
import hyperalign
import losses
import prefs
import scoring
from config import RunConfig, flag
from toy import judge as toy_judge

POINTER, CONFIG, LOG, LOCK = "checkpoint.json", "config.json", "metrics.jsonl", ".lock"
RUN_FILES = (CONFIG, POINTER, LOG, LOCK, "metrics.json", "samples.png", "val.json")  # a run folder, besides ...
CKPT = re.compile(r"^ckpt-\d{6}$")                                         # ... its step folders, which hold ...
CKPT_FILES = ("weights.safetensors", "optim.pt")                            # ... these
TMP = re.compile(r"^\..+\.tmp-\d+$")                                        # files.write_atomic's temporary names
# settings that may differ when a run is resumed: how long it goes on, how it is checkpointed, evaluated and placed
# (the batch size per process may change with the number of processes, as long as the global batch stays the same)
RESUMABLE = ("steps", "save_every", "no_eval", "n_eval", "eval_seeds", "eval_batch", "eval_prompts", "device",
             "threads", "out", "batch_size")


class RunError(ValueError):
    """A run folder or checkpoint that cannot be used as asked; the message names it."""


# ------------------------------------------------------------------------------------------------------ run folders

def foreign(out: str) -> list[str]:
    """What in folder `out` is not part of a run of ours (paths relative to it): anything but RUN_FILES, step
    folders holding only CKPT_FILES, and temporary files of an interrupted write."""
    found = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if CKPT.match(name) and os.path.isdir(path) and not os.path.islink(path):
            found += [os.path.join(name, f) for f in sorted(os.listdir(path)) if f not in CKPT_FILES and not TMP.match(f)]
        elif not (name in RUN_FILES or TMP.match(name)) or os.path.isdir(path) or os.path.islink(path):
            found.append(name + ("/" if os.path.isdir(path) else ""))
    return found


def prepare(out: str, resume: bool, overwrite: bool) -> None:
    """Refuse --out before anything is loaded or written: a file, an unwritable place, a folder that already holds a
    run without --resume / --overwrite, or --overwrite of a folder that holds anything but a run of ours. Nothing is
    created here; `claim` checks again under the folder's lock."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--out {out} is a file, not a run folder")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(out if os.path.isdir(out) else parent, os.W_OK):
        raise RunError(f"--out {out}: not writable")
    holds = os.path.isdir(out) and [n for n in os.listdir(out) if n != LOCK]
    if resume and not os.path.isfile(os.path.join(out, POINTER)):
        raise RunError(f"--resume: no checkpoint in {out} (no {POINTER})")
    if holds and not resume and not overwrite:
        raise RunError(f"--out {out} already holds a run: pass --resume to continue it, --overwrite to replace it, "
                       "or another --out")
    if holds and overwrite:
        other = foreign(out)
        if other:
            shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
            raise RunError(f"--overwrite: {out} holds files that are not a run's ({shown}); refusing to delete them")


_LOCKS: dict[str, int] = {}          # run folder -> the open file descriptor of its lock, held until the process ends


def claim(out: str, resume: bool, overwrite: bool) -> None:
    """Take the run folder for this process: create it, lock it (DIR/.lock, an advisory lock the system drops when
    the process ends, however it ends), check it again under the lock, and for --overwrite remove the old run's files.

    A second writer is refused naming the process that holds the lock. A lock file left by a process that has died
    holds no lock (the system released it), so it is taken over; its PID is only read for the message."""
    import fcntl
    key = os.path.abspath(out)
    if key in _LOCKS:
        return
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise RunError(f"--out {out} is being written by another process (PID {holder}, lock {path}): wait for it "
                       "to end, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd
    try:
        prepare(out, resume, overwrite)             # again, now that no other process can change the folder
    except RunError:
        release(out)
        raise
    if overwrite:
        for name in os.listdir(out):
            p = os.path.join(out, name)
            if name != LOCK:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def release(out: str) -> None:
    """Drop this process's lock on `out` (the lock file stays: it is part of the run folder)."""
    fd = _LOCKS.pop(os.path.abspath(out), None)
    if fd is not None:
        os.close(fd)


def start(out: str, overwrite: bool, saved: dict) -> None:
    """Claim the run folder (created, locked; with --overwrite emptied) and write its config.json."""
    claim(out, False, overwrite)
    files.write_json(os.path.join(out, CONFIG), saved)


def read_config(out: str) -> dict:
    """A run's config.json, checked against the digest its checkpoint pointer holds (an edited config.json would
    silently change what is rebuilt: the variant, alpha, the model)."""
    path = os.path.join(out, CONFIG)
    saved = files.read_json(path, "run config")
    pointer = os.path.join(out, POINTER)
    if os.path.isfile(pointer):
        digest = files.read_json(pointer, "checkpoint pointer").get("sha256", {}).get(CONFIG)
        with open(path, "rb") as f:
            if digest is not None and hashlib.sha256(f.read()).hexdigest() != digest:
                raise RunError(f"{path} does not match {POINTER} (edited after the run started): refusing it")
    if not isinstance(saved, dict):
        raise RunError(f"{path}: not a run config")
    return saved


def check_resume(out: str, cfg: RunConfig, method: str, world: int = 1) -> dict:
    """The saved config of the run in `out`, if `cfg` continues it: the same method and settings (RESUMABLE may
    differ) and the same global batch (processes x --batch-size). A changed setting is refused, listing them."""
    saved = read_config(out)
    if saved.get("method") != method:
        raise RunError(f"--resume: {out} holds a {saved.get('method')} run, not {method}")
    mine, theirs = cfg.to_dict(), saved.get("run", {})
    changed = [f"--{flag(k)} {theirs.get(k)!r} -> {v!r}" for k, v in mine.items()
               if k not in RESUMABLE and theirs.get(k) != v]
    if theirs.get("batch_size", 0) * saved.get("world", 1) != cfg.batch_size * world:
        changed.append(f"global batch {theirs.get('batch_size', 0) * saved.get('world', 1)} -> "
                       f"{cfg.batch_size * world} (processes x --batch-size)")
    if changed:
        raise RunError(f"--resume: {out} was trained with other settings: {'; '.join(changed)} (start a new run "
                       "with another --out to change them)")
    return saved


def check_output(path: str, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output file a script would write: an existing one without --overwrite, and, even with it, a run
    folder's own files or anything inside its step folders (they are covered by its digests)."""
    full = os.path.abspath(path)
    folder, name = os.path.split(full)
    parts = full.split(os.sep)
    for i, part in enumerate(parts[:-1]):
        if CKPT.match(part) and os.path.isfile(os.sep.join(parts[:i] + [POINTER])):
            raise RunError(f"{flag} {path} is inside the checkpoint folder of the run in {os.sep.join(parts[:i])}: "
                           "refusing to write there")
    if name in RUN_FILES and os.path.isfile(os.path.join(folder, POINTER)):
        raise RunError(f"{flag} {path} is a file of the run in {folder}: refusing to write it")
    if os.path.isdir(full):
        raise RunError(f"{flag} {path} is a folder")
    if os.path.exists(full) and not overwrite:
        raise RunError(f"{flag} {path} already exists: pass --overwrite to replace it")


# ------------------------------------------------------------------------------------------------------ checkpoints

def non_finite(tensors) -> list[str]:
    """The names of the floating-point tensors in (name, tensor) pairs that hold a NaN or an infinity."""
    return [k for k, v in tensors if v.is_floating_point() and not torch.isfinite(v).all()]


def save(out: str, step: int, module: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Write checkpoint `step` (see the module docstring). Non-finite weights are never written."""
    sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    bad = non_finite(sd.items())
    if bad:
        raise RunError(f"refusing to checkpoint non-finite weights ({', '.join(bad[:3])}); the checkpoint in {out} "
                       "is the last good one")
    blobs = {"weights.safetensors": save_safetensors(sd, metadata={"step": str(step)})}
    buf = io.BytesIO()
    torch.save({"step": step, "optim": opt.state_dict()}, buf)
    blobs["optim.pt"] = buf.getvalue()
    folder = f"ckpt-{step:06d}"
    path = os.path.join(out, folder)
    if os.path.isdir(path):                      # left by a save that died before its pointer was written
        shutil.rmtree(path)
    os.makedirs(path)
    for name, data in blobs.items():
        files.write_bytes(os.path.join(path, name), data)
    digests = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    with open(os.path.join(out, CONFIG), "rb") as f:     # the settings the weights belong to are covered too
        digests[CONFIG] = hashlib.sha256(f.read()).hexdigest()
    files.write_json(os.path.join(out, POINTER), {"step": step, "folder": folder, "sha256": digests})
    for old in os.listdir(out):
        if old.startswith("ckpt-") and old != folder:
            shutil.rmtree(os.path.join(out, old), ignore_errors=True)


def load(out: str) -> tuple[dict, dict, int]:
    """(weights, optimizer state, step) of the checkpoint `out`'s pointer names, verified: every file present, its
    digest the pointer's, the step the same in all three."""
    pointer = files.read_json(os.path.join(out, POINTER), "checkpoint pointer")
    try:
        step, folder, digests = int(pointer["step"]), str(pointer["folder"]), dict(pointer["sha256"])
    except (KeyError, TypeError, ValueError):
        raise RunError(f"{os.path.join(out, POINTER)}: not a checkpoint pointer") from None
    blobs = {}
    for name in ("weights.safetensors", "optim.pt"):
        path = os.path.join(out, folder, name)
        try:
            with open(path, "rb") as f:
                blobs[name] = f.read()
        except OSError as e:
            raise RunError(f"checkpoint {path}: {e.strerror or e}") from None
        if hashlib.sha256(blobs[name]).hexdigest() != digests.get(name):
            raise RunError(f"checkpoint {path} does not match {POINTER} (torn or edited checkpoint): refusing it")
    try:
        weights = load_safetensors(blobs["weights.safetensors"])
        state = torch.load(io.BytesIO(blobs["optim.pt"]), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a file that passed its digest but does not parse: one clear error
        raise RunError(f"checkpoint {os.path.join(out, folder)}: unreadable: {e}") from None
    if state.get("step") != step:
        raise RunError(f"checkpoint {os.path.join(out, folder)}: optim.pt is for step {state.get('step')}, not {step}")
    bad = non_finite(weights.items())
    if bad:     # save() never writes them: the file was made or edited elsewhere and its digest recomputed
        raise RunError(f"checkpoint {os.path.join(out, folder)} holds non-finite weights ({', '.join(bad[:3])}), "
                       "which no run of ours writes: start again with --overwrite")
    return weights, state["optim"], step


def load_trained(out: str, backbone, device=None):
    """Rebuild a trained method from its run folder on a frozen backbone: (HyperAlign or methods.StaticLoRA, the
    saved config). The architecture, variant and P's key steps come from config.json; weights are loaded strictly."""
    import methods
    from weights import check_state_dict
    if not os.path.isdir(out):
        raise RunError(f"no such run folder: {out}")
    saved = read_config(out)
    try:
        hcfg = hyperalign.HyperConfig(**saved["hyper"])
        kind = saved["method"]
    except (KeyError, TypeError) as e:
        raise RunError(f"{os.path.join(out, CONFIG)}: not a run config ({e})") from None
    if kind not in ("hyperalign", "static"):
        raise RunError(f"{os.path.join(out, CONFIG)}: unknown method {kind!r}")
    method = hyperalign.HyperAlign(hcfg, backbone) if kind == "hyperalign" else methods.StaticLoRA(hcfg, backbone)
    module = method.hypernet if kind == "hyperalign" else method
    weights, _, step = load(out)
    check_state_dict(module, weights, f"{out} (trained for another model?)")
    module.load_state_dict(weights, strict=True)
    saved["step"] = step
    return (method.to(device) if device is not None else method), saved


# --------------------------------------------------------------------------------------------------------- training

def step_generator(seed: int, step: int) -> torch.Generator:
    """All randomness of training step `step` comes from here: a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def fit(method, module: torch.nn.Module, opt: torch.optim.Optimizer, pipe, reward, prompts: list[str],
        prefs_reader, cfg: RunConfig, step: int, ctx: distributed.Context = distributed.Context(),
        desc: str = "train") -> int:
    """Train `module` (the trainable part of `method`) from `step` to cfg.steps with losses.training_step,
    checkpointing into cfg.out. Non-finite values stop it before the optimiser step (the last good checkpoint stays).
    Returns the number of steps run."""
    net = distributed.wrap(module, ctx, pipe.device)  # DDP over the trainable part only; the frozen models are not
    pref_iter = (prefs.stream(prefs_reader, cfg.batch_size, pipe.resolution, step, ctx)
                 if prefs_reader is not None and cfg.lambda_reg > 0 else None)
    log_path = os.path.join(cfg.out, LOG)
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
            log = losses.training_step(method, pipe, reward, batch, next(pref_iter) if pref_iter else None,
                                       cfg.lambda_reg, gen, cfg.reward_from, cfg.reward_mode,
                                       ctx.rows(cfg.batch_size), net)
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"gradient norm is {grad_norm.item()}")
            opt.step()
            bad = non_finite(module.named_parameters())
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
            save(cfg.out, step + 1, module, opt)
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


def setup(cfg: RunConfig, resume: bool, overwrite: bool, pipe=None, reward=None, prefs_reader=None,
          judge=None) -> Inputs:
    """Threads, process group, --out checks, then every input of the run (the objects may be passed in: tests)."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx, device = distributed.init(cfg.device)      # torchrun: join the group (gloo / nccl); else no group
    prepare(cfg.out, resume, overwrite)             # refuse a used --out before loading or writing anything
    pipe = pipe or config.load_pipeline(cfg, device)
    prompts = config.read_prompts(cfg.prompts)
    sets = {} if cfg.no_eval else config.eval_sets(cfg)
    reward = reward or config.load_reward(cfg.reward, cfg.reward_tokenizer, device, cfg.reward_dtype)
    if prefs_reader is None and cfg.lambda_reg > 0:
        prefs_reader = config.load_prefs(cfg, prompts, [p for ps in sets.values() for p in ps])
        if next(iter(prefs_reader), None) is None:  # readers are lazy: read one pair now, before a file is touched
            raise RunError(f"--prefs {cfg.prefs}: no preference pair to train L_G on (after dropping held-out prompts)")
    if judge is None and sets and all(s.strip().startswith("toy:") for s in cfg.eval_prompts.split(",")):
        judge = toy_judge.judge                     # the toy world's ground truth, for toy prompts only
    pipe.backbone.model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.grad_ckpt:
        pipe.backbone.model.train()  # the U-Net checkpoints only in training mode (no dropout or batch norm in it)
    return Inputs(pipe, prompts, sets, reward, prefs_reader, judge, ctx, device)


def begin(kind: str, method, module: torch.nn.Module, opt, cfg: RunConfig, inp: Inputs, resume: bool,
          overwrite: bool, calibrate=None) -> int:
    """Resume the run in cfg.out (same settings, verified checkpoint) or start it (calibrate P, write config.json
    and the step-0 checkpoint). Returns the step training goes on from."""
    if resume:
        if inp.ctx.main:
            claim(cfg.out, True, False)
        saved = check_resume(cfg.out, cfg, kind, inp.ctx.world)
        weights, optim, step = load(cfg.out)
        method.cfg.key_steps, method.cfg.key_of = tuple(saved["hyper"]["key_steps"]), saved["hyper"]["key_of"]
        module.load_state_dict(weights, strict=True)
        opt.load_state_dict(optim)
        if inp.ctx.main:
            print(f"resumed {cfg.out} at step {step}")
        return step
    if calibrate is not None:
        calibrate()
    if inp.ctx.main:
        start(cfg.out, overwrite, {"method": kind, "run": cfg.to_dict(), "hyper": method.cfg.to_dict(),
                                   "world": inp.ctx.world})
        save(cfg.out, 0, module, opt)
    return 0


def finish(method, module: torch.nn.Module, cfg: RunConfig, inp: Inputs, name: str, times: dict) -> dict:
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


def train(kind: str, cfg: RunConfig, resume: bool = False, overwrite: bool = False, **given) -> dict:
    """A whole run: "hyperalign" (train.py) or "static" (baselines.py) per `cfg`, from loading to the summary.
    `given`: pipe, reward, prefs_reader, judge objects to use instead of loading them (tests, evaluate.py)."""
    import methods
    t0 = time.time()
    inp = setup(cfg, resume, overwrite, **given)
    if kind == "hyperalign":
        method = hyperalign.HyperAlign(config.hyper_config(cfg), inp.pipe.backbone).to(inp.device)
        module, name = method.hypernet, f"HyperAlign-{cfg.variant}"
    else:
        method = module = methods.StaticLoRA(config.hyper_config(cfg), inp.pipe.backbone).to(inp.device)
        name = "static LoRA" if cfg.reward_mode == "one-step" else "Direct-Align"
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=0.0)
    p_rule = (lambda: hyperalign.calibrate(method, inp.pipe, inp.prompts[:16], cfg.key_steps, cfg.seed, inp.ctx)) \
        if method.cfg.variant == "P" and kind == "hyperalign" else None
    try:
        step = begin(kind, method, module, opt, cfg, inp, resume, overwrite, p_rule)
        t1 = time.time()
        fit(method, module, opt, inp.pipe, inp.reward, inp.prompts, inp.prefs_reader, cfg, step, inp.ctx, name)
        return finish(method, module, cfg, inp, name, {"setup": round(t1 - t0, 1),
                                                       "train": round(time.time() - t1, 1)})
    except KeyboardInterrupt as e:  # every file is written atomically: what is on disk is whole, say what is kept
        raise KeyboardInterrupt("; ".join(filter(None, (str(e), kept(cfg.out))))) from None
    finally:
        release(cfg.out)


def kept(out: str) -> str:
    """What an interrupted run leaves in `out`, in one sentence."""
    try:
        step = files.read_json(os.path.join(out, POINTER), "checkpoint pointer")["step"]
    except (ValueError, KeyError, TypeError):
        return f"no checkpoint was written in {out}"
    return f"{out} keeps its checkpoint of step {step} (whole): continue with --resume"
