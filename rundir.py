"""Run folders that cannot lose work: their layout, the lock of the process writing one, and atomic checkpoints.

    DIR/config.json        {"method", "run": RunConfig, "hyper": HyperConfig}, written when the run starts
    DIR/checkpoint.json    the pointer: {"step", "folder", "sha256": {file: digest}} (config.json's digest too),
                           replaced atomically
    DIR/ckpt-000150/       weights.safetensors (trainable parameters, step in the metadata), optim.pt (AdamW state)
    DIR/metrics.jsonl      one line per training step
    DIR/metrics.json, samples.png   the evaluation at the end
    DIR/.lock              held by the process writing the folder (the system drops it when that process ends)

One checkpoint is one step folder written in full (every file fsynced), then the pointer is swapped to it, then the
older step folders are removed: a kill or a full disk at any moment leaves the previous checkpoint whole and
pointed at. Loading checks the digests and the step, so a torn or edited set is refused, not half-loaded. A folder
that holds a run is never reused by accident: `--resume` continues it (with the same settings), `--overwrite`
replaces it if it holds nothing but a run, anything else is refused before a file is touched.

    check_folder(out, resume, overwrite)   refuse an unusable --out before anything is loaded (creates nothing)
    create(out, overwrite, saved)          lock the folder (lock_folder), empty it for --overwrite, write config.json
    save(out, step, module, opt)           one checkpoint;  load(out): the verified latest one
    check_output(path, overwrite)          what every other script checks before it writes a file
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import files
from config import RunConfig, flag

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


def check_folder(out: str, resume: bool, overwrite: bool) -> None:
    """Refuse --out before anything is loaded or written: a file, an unwritable place, a folder that already holds a
    run without --resume / --overwrite, or --overwrite of a folder that holds anything but a run of ours. Nothing is
    created here; `lock_folder` checks again under the folder's lock."""
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


def lock_folder(out: str, resume: bool, overwrite: bool) -> None:
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
        check_folder(out, resume, overwrite)        # again, now that no other process can change the folder
    except RunError:
        unlock_folder(out)
        raise
    if overwrite:
        for name in os.listdir(out):
            p = os.path.join(out, name)
            if name != LOCK:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


def unlock_folder(out: str) -> None:
    """Drop this process's lock on `out` (the lock file stays: it is part of the run folder)."""
    fd = _LOCKS.pop(os.path.abspath(out), None)
    if fd is not None:
        os.close(fd)


def create(out: str, overwrite: bool, saved: dict) -> None:
    """Lock the run folder (created; with --overwrite emptied) and write its config.json."""
    lock_folder(out, False, overwrite)
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
    mine, theirs = cfg.to_dict(), {**RunConfig().to_dict(), **saved.get("run", {})}   # a setting added since: its default
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


def kept(out: str) -> str:
    """What an interrupted run leaves in `out`, in one sentence."""
    try:
        step = files.read_json(os.path.join(out, POINTER), "checkpoint pointer")["step"]
    except (ValueError, KeyError, TypeError):
        return f"no checkpoint was written in {out}"
    return f"{out} keeps its checkpoint of step {step} (whole): continue with --resume"
