"""One run configuration: every setting of a training run (train.py, baselines.py), with named presets, one argparse
builder, and the few functions that turn settings into objects (prompts, reward, preference data).

    cfg, resume, overwrite = config.parse(argv)  preset (--preset, default toy-sd) + the flags given, checked
    cfg = config.RunConfig.from_preset("toy-flux", steps=300)
    pipe = config.load_pipeline(cfg); reward = config.load_reward(cfg.reward); prompts = config.read_prompts(cfg.prompts)
    code = config.cli(lambda: ...)              how every script ends: bad input one line and exit 2, Ctrl-C exit 130

The whole RunConfig is saved in every run's config.json, so a run can be rebuilt, resumed and compared exactly.
Presets: toy-sd / toy-flux (the shipped toy world, runs on a CPU in minutes) and sd15 / flux-dev (real checkpoints
at local paths, the paper's sampling settings; model, reward, prompts and preference data must be given).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable

import torch

import imagereward
import presets
import rewards
from hyperalign import VARIANTS
from toy import rewards as toy_rewards
from toy import world

PRESET_NAMES = ("toy-sd", "toy-flux", "sd15", "flux-dev")
REWARD_MODES = ("one-step", "direct-align")
OBJECTIVES = ("hyperalign", "dpo", "kto", "grpo")
BASELINE_FLAGS = ("objective", "beta", "grpo_group", "grpo_clip", "grpo_kl", "grpo_eta", "grpo_fraction")  # baselines.py
DTYPES = ("float32", "bfloat16", "float16")
# every reward a spec may name: the real ones and the toy world's (an explicit table; nothing registers on import)
REWARDS = {**rewards.REWARDS, **imagereward.REWARDS, **toy_rewards.REWARDS}


@dataclass
class RunConfig:
    preset: str = "toy-sd"
    # ---- the frozen model
    model: str = field(default=world.SD_DIR, metadata={"help": "SD1.x / FLUX weights: a diffusers folder or a single "
                                                                 "file"})
    tokenizer: str | None = field(default=None, metadata={"help": "CLIP tokenizer folder, for a single-file SD model"})
    dtype: str = field(default="float32", metadata={"help": "dtype of the frozen models", "choices": DTYPES})
    resolution: int | None = field(default=None, metadata={"help": "image size (default: the VAE config's)"})
    sample_steps: int | None = field(default=20, metadata={"help": "sampling steps (default: SD 50, FLUX 28)"})
    guidance: float | None = field(default=5.0, metadata={"help": "CFG scale (SD) / distilled guidance (FLUX-dev)"})
    # ---- data
    prompts: str = field(default="toy:hyper-train", metadata={"help": "training prompts: a text file, one per "
                                                                       "line, or toy:SPLIT"})
    eval_prompts: str = field(default="toy:unseen,toy:heldout", metadata={
        "help": "held-out prompt sets, comma-separated (files or toy:SPLIT); each is scored separately"})
    prefs: str | None = field(default=world.PREFS_PATH, metadata={
        "help": "preference data for L_G: Pick-a-Pic parquet, HPDv2 train.json, or JSONL (prefs.py)"})
    reward: str = field(default="toy-comp", metadata={"help": "reward spec 'name[:path][=weight],...' (rewards.py)"})
    reward_tokenizer: str | None = field(default=None, metadata={"help": "CLIP tokenizer folder for rewards "
                                                                          "without one (HPS)"})
    reward_dtype: str = field(default="float32", metadata={"help": "dtype of the reward model", "choices": DTYPES})
    # ---- the method
    variant: str = field(default="I", metadata={"help": "S: LoRA every step, I: once from x_T, P: at key steps",
                                                "choices": VARIANTS})
    hyper: str = field(default="toy-sd", metadata={"help": "hypernetwork size preset (hyperalign.PRESETS)"})
    rank: int | None = field(default=None, metadata={"help": "LoRA rank R (default: the hypernetwork preset's); "
                                                             "HyperAlign's generated LoRA has rank 2R, the static "
                                                             "LoRA rank R"})
    key_steps: int = field(default=3, metadata={"help": "P: curvature key steps K (plus step 0)"})
    # ---- training
    steps: int = field(default=150, metadata={"help": "training steps"})
    batch_size: int = field(default=4, metadata={"help": "samples per step and process (torchrun: N x this)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate (chosen on the toy val split)"})
    lambda_reg: float = field(default=1.0, metadata={"help": "λ, the weight of L_G (0: reward only)"})
    reward_from: float = field(default=0.25, metadata={"help": "L_R at steps from this fraction of the trajectory "
                                                                "on (0: every step; chosen on the toy val split)"})
    reward_mode: str = field(default="one-step", metadata={
        "help": "one-step: L_R on x0_hat at a rolled-out x_t (the paper); direct-align: at a rolled-out x0 noised "
                "with a known eps, recovered after one step (SRPO)", "choices": REWARD_MODES})
    # ---- the baselines' objectives (baselines.py; finetune.py): the static LoRA trained with another loss
    objective: str = field(default="hyperalign", metadata={
        "help": "hyperalign: L_R + λ L_G (train.py; baselines.py's static LoRA); dpo: Diffusion-DPO; kto: "
                "Diffusion-KTO; grpo: DDPO / Flow-GRPO", "choices": OBJECTIVES})
    beta: float | None = field(default=None, metadata={"help": "DPO / KTO β (default: the authors' 5000 / 1000)"})
    grpo_group: int = field(default=4, metadata={"help": "GRPO: samples per prompt"})
    grpo_clip: float = field(default=1e-4, metadata={"help": "GRPO: PPO clip range (DDPO, Flow-GRPO: 1e-4)"})
    grpo_kl: float = field(default=0.0, metadata={"help": "GRPO: weight of the KL to the base model (Flow-GRPO "
                                                            "0.01-0.04; DDPO, DanceGRPO: 0)"})
    grpo_eta: float | None = field(default=None, metadata={"help": "GRPO: sampler noise (default: DDIM η 1 for VP, "
                                                                   "Flow-GRPO's 0.7 for flow)"})
    grpo_fraction: float = field(default=0.6, metadata={"help": "GRPO: share of the steps trained on (DanceGRPO)"})
    seed: int = field(default=0, metadata={"help": "training seed"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every this many steps"})
    grad_ckpt: bool = field(default=False, metadata={"help": "gradient checkpointing in the frozen model"})
    # ---- evaluation at the end
    n_eval: int | None = field(default=None, metadata={"help": "prompts per held-out set (default: all)"})
    eval_seeds: int = field(default=2, metadata={"help": "samples (seeds) per held-out prompt"})
    eval_batch: int = field(default=16, metadata={"help": "samples per evaluation batch"})
    no_eval: bool = field(default=False, metadata={"help": "skip the evaluation at the end"})
    # ---- machine and files
    out: str = field(default="runs/hyperalign", metadata={"help": "run folder DIR"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda (torchrun: cuda:LOCAL_RANK per process)"})
    threads: int | None = field(default=1, metadata={"help": "CPU threads (default: torch's)"})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "RunConfig":
        return presets.pick(PRESETS, name, "--preset", **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "RunConfig":
        """Refuse settings that cannot run, naming the flag (ValueError: the scripts exit 2 with it)."""
        positive = ("steps", "batch_size", "save_every", "key_steps", "eval_seeds", "eval_batch", "n_eval",
                    "sample_steps", "rank", "resolution", "threads", "grpo_group")
        for name in positive:
            v = getattr(self, name)
            if v is not None and v < (0 if name == "steps" else 1):
                raise ValueError(f"--{flag(name)} must be positive, got {v}")
        for name in ("lr", "lambda_reg", "reward_from", "guidance", "beta", "grpo_clip", "grpo_kl", "grpo_eta",
                     "grpo_fraction"):                                  # NaN passes every comparison: refuse it
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"--{flag(name)} must be a finite number, got {v}")
        if self.lambda_reg < 0 or not self.lr > 0:
            raise ValueError(f"--lambda-reg must be >= 0 and --lr > 0 (got {self.lambda_reg}, {self.lr})")
        if not 0 <= self.reward_from < 1:
            raise ValueError(f"--reward-from must be in [0, 1), got {self.reward_from}")
        if self.guidance is not None and self.guidance < 0:
            raise ValueError(f"--guidance must be >= 0, got {self.guidance}")
        if self.grpo_group < 2 or not 0 < self.grpo_fraction <= 1 or min(self.grpo_clip, self.grpo_kl) < 0 or \
                (self.beta is not None and self.beta <= 0) or (self.grpo_eta is not None and self.grpo_eta <= 0):
            raise ValueError("GRPO needs --grpo-group >= 2, --grpo-fraction in (0, 1], --grpo-clip / --grpo-kl >= 0 "
                             "and --grpo-eta > 0; --beta must be > 0")
        if not 0 <= self.seed < 2 ** 32:      # step seeds are seed * 1_000_003 + step: they must fit a generator's
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        for name, choices in (("variant", VARIANTS), ("reward_mode", REWARD_MODES), ("dtype", DTYPES),
                              ("reward_dtype", DTYPES), ("objective", OBJECTIVES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"--{flag(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("model", "prompts", "reward"):
            if not getattr(self, name):
                raise ValueError(f"--{flag(name)} is required with --preset {self.preset}")
        if self.reward:
            rewards.parse_spec(self.reward, REWARDS)
        if not self.no_eval and not self.eval_prompts:
            raise ValueError("--eval-prompts is required (held-out prompts to score the run on), or pass --no-eval")
        if (self.lambda_reg > 0 or self.objective in ("dpo", "kto")) and not self.prefs:
            raise ValueError("--prefs is required for L_G and for DPO / KTO (or pass --lambda-reg 0)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: CUDA is not available on this machine")
        return self


# Settings of the toy tables beside RunConfig's defaults, chosen on the 'val' split by `python evaluate.py --search`
# (docs/results/search.json: where L_R is taken, then the learning rate of each method; search-toy-flux.json: the
# learning rates on toy FLUX): the static LoRA's own lr per preset, and guidance's step ρ. RunConfig's reward_from
# (0.25) and each toy preset's lr are HyperAlign-I's choices.
STATIC_LR = {"toy-sd": 3e-4, "toy-flux": 1e-3}
GUIDANCE_RHO = 0.3


def static(preset: str) -> dict:
    """The static LoRA's settings over the preset's (its learning rate; 3e-4 where none was searched)."""
    return {"lr": STATIC_LR.get(preset, 3e-4)}

_TOY = RunConfig()
PRESETS: dict[str, RunConfig] = {
    "toy-sd": _TOY,
    # NOTE: the toy FLUX is schnell-style (no guidance embedding): guidance does not apply
    "toy-flux": replace(_TOY, preset="toy-flux", model=world.FLUX_DIR, guidance=None, hyper="toy-flux", lr=1e-3),
    # real checkpoints: the paper's sampling settings (SD1.5 50 DDIM steps, CFG 7.5; FLUX-dev 28 steps, guidance 3.5),
    # everything else given on the command line
    "sd15": replace(_TOY, preset="sd15", model="", sample_steps=None, guidance=None, prompts="", eval_prompts="",
                    prefs=None, reward="", hyper="sd15", steps=2000, lr=1e-4, n_eval=64, eval_seeds=1, eval_batch=4,
                    threads=None, out="runs/sd15"),
    "flux-dev": replace(_TOY, preset="flux-dev", model="", sample_steps=None, guidance=None, prompts="",
                        eval_prompts="", prefs=None, reward="", hyper="flux-dev", steps=2000, lr=1e-4, n_eval=64,
                        eval_seeds=1, eval_batch=1, threads=None, out="runs/flux-dev"),
}


def cli(run: Callable[[], object]) -> int:
    """A script's body, run the way every script here ends: bad input (a ValueError: paths, flags, specs, run
    folders, checkpoints) is one line `error: ...` and exit status 2; Ctrl-C is one line and exit status 130 (what
    the interrupted work left behind is said by the KeyboardInterrupt's message, e.g. runs.train's). 0 otherwise."""
    try:
        run()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"interrupted: {e or 'stopped before anything was written'}", file=sys.stderr)
        return 130
    return 0


def flag(name: str) -> str:
    return name.replace("_", "-")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line `error: ...` on stderr and exit status 2 (no usage block)."""

    def error(self, message: str):
        print(f"error: {message} (--help lists the flags)", file=sys.stderr)
        sys.exit(2)


def parser(description: str, exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """One flag per RunConfig field (minus `exclude`), defaults left unset so that the preset fills them."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               argument_default=argparse.SUPPRESS)
    p.add_argument("--preset", choices=PRESET_NAMES, default=argparse.SUPPRESS,
                   help="settings to start from (default toy-sd); every flag below overrides one")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (it is refused otherwise)")
    for f in fields(RunConfig):
        if f.name == "preset" or f.name in exclude:
            continue
        kw = {"help": f.metadata.get("help", "")}
        if f.type in ("bool",):
            p.add_argument(f"--{flag(f.name)}", action="store_true", **kw)
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        p.add_argument(f"--{flag(f.name)}", type=kind, **kw)
    return p


def parse(argv=None, description: str = "", exclude: tuple[str, ...] = (), per_preset=None,
          **defaults) -> tuple[RunConfig, bool, bool]:
    """argv -> (RunConfig: the preset, then `defaults` (the script's own; `per_preset(preset)` adds more), then the
    flags given, checked; --resume; --overwrite). Bad values exit 2."""
    p = parser(description, exclude)
    ns = vars(p.parse_args(argv))
    given = {k: v for k, v in ns.items() if k in {f.name for f in fields(RunConfig)}}
    preset = given.pop("preset", "toy-sd")
    try:
        cfg = RunConfig.from_preset(preset, **{**defaults, **(per_preset(preset) if per_preset else {}),
                                               **given}).check()
    except ValueError as e:
        p.error(str(e))
    return cfg, ns.get("resume", False), ns.get("overwrite", False)


# ------------------------------------------------------------------------------------------- settings -> objects

def read_prompts(spec: str) -> list[str]:
    """'toy:SPLIT' (toy/world.py's splits), 'toy:SPLIT@GROUPING=VALUE' (the split's prompts of one group, e.g.
    toy:hyper-train@relation=left of: world.group) or a text file with one prompt per line (blank lines skipped)."""
    if spec.startswith("toy:"):
        split, _, grp = spec[len("toy:"):].partition("@")
        ps = world.prompts(split)
        if grp:
            grouping, _, value = grp.partition("=")
            ps = [p for p in ps if world.group(p, grouping) == value]
            if not ps:
                raise ValueError(f"--prompts {spec}: no prompt of {split} in that group")
        return ps
    if not os.path.isfile(spec):
        raise ValueError(f"no such prompt file: {spec}")
    try:
        with open(spec, encoding="utf-8-sig") as f:            # a byte-order mark is not part of the first prompt
            lines = [ln.strip() for ln in f if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{spec}: not a readable UTF-8 text file: {e}") from None
    if not lines:
        raise ValueError(f"{spec}: no prompts")
    return lines


def eval_sets(cfg: RunConfig) -> dict[str, list[str]]:
    """{name: prompts} of the held-out sets, in the order given (name: the toy split, or the file's stem); a
    non-toy set is taken whole, a toy split shuffled with a fixed seed; both cut to --n-eval."""
    out = {}
    for spec in filter(None, (s.strip() for s in cfg.eval_prompts.split(","))):
        name = spec[len("toy:"):] if spec.startswith("toy:") else os.path.splitext(os.path.basename(spec))[0]
        ps = world.eval_prompts(name, cfg.n_eval) if spec.startswith("toy:") else read_prompts(spec)[:cfg.n_eval]
        out[name if name not in out else f"{name}_{len(out)}"] = ps
    return out


def load_reward(spec: str, tokenizer: str | None = None, device="cpu", dtype: str = "float32",
                flag: str = "--reward") -> rewards.WeightedSum:
    return rewards.parse_reward_spec(spec, tokenizer=tokenizer, device=device, dtype=getattr(torch, dtype),
                                     registry=REWARDS, flag=flag)


def load_prefs(cfg: RunConfig, train_prompts: list[str], held_out: list[str]):
    """L_G's preference data, without the pairs of any held-out prompt that is not also a training prompt.

    NOTE: L_G must not see the prompts the run is scored on (the paper trains on Pick-a-Pic / HPD prompts and tests
    on others). The toy pairs cover every train-split caption, so with toy training prompts every prompt the toy world
    holds out of training (its 'val', 'unseen' and 'heldout' splits) is dropped, whichever set this run scores."""
    import prefs
    if cfg.prompts.startswith("toy:"):
        held_out = [*held_out, *world.prompts("val"), *world.prompts("unseen"), *world.prompts("heldout")]
    return prefs.Excluding(prefs.open_prefs(cfg.prefs), set(held_out) - set(train_prompts))


def load_pipeline(cfg: RunConfig, device=None):
    import pipeline
    return pipeline.load(cfg.model, device or cfg.device, getattr(torch, cfg.dtype), cfg.resolution, cfg.resolution,
                         cfg.sample_steps, cfg.guidance, cfg.tokenizer)


def hyper_config(cfg: RunConfig):
    """The hypernetwork's (or static LoRA's) architecture: the --hyper preset with --variant and --rank. A --rank R
    also sets alpha = R, so that the LoRA scale s = alpha / R stays 1 (the presets' own choice). NOTE: HyperAlign's
    generated LoRA has rank 2R at --rank R (hyperalign.HyperNet: [B − B⁰, B⁰]); the static LoRA has rank R."""
    import hyperalign
    over = {"variant": cfg.variant, **({"rank": cfg.rank, "alpha": float(cfg.rank)} if cfg.rank else {})}
    return hyperalign.HyperConfig.preset(cfg.hyper, **over)
