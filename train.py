"""Train a HyperAlign hypernetwork: `python train.py --variant I` (S, P) runs on the toy SD model out of the box.

Each step, for a batch of prompts (paper sec. 3.3, L = L_R + λ L_G):
  1. roll out trajectories without gradient with the *current* hypernetwork (variant S / I / P);
  2. per sample, pick a step k of its trajectory; the hypernetwork makes Δθ from the state its variant would use
     (S: x_k; I: x_T; P: the state at the start of k's segment); one modulated model step at x_k gives x0_hat, which
     is decoded and scored: L_R = -r(D(x0_hat));
  3. L_G: a preferred image from the preference data, noised to a random t, denoised by the modulated model;
  4. AdamW on the hypernetwork only. The frozen generator, VAE, text encoder and reward get no gradients.

Multi-GPU: `torchrun --nproc_per_node N train.py ...` (distributed.py): DDP over the hypernetwork only, each rank its
rows of every global batch (N x --batch-size), rank 0 writes the files; without torchrun, one process as before.

Writes DIR/hypernet.safetensors + DIR/config.json (enough to rebuild; sample.py --hyper DIR), DIR/optim.pt (resume),
DIR/metrics.jsonl during training, and at the end DIR/metrics.json (reward and toy judge, base vs aligned, held-out
prompts, fixed seeds; toy: the 'unseen' split, and the 'heldout' compositions under their own key) and
DIR/samples.png (top row base, bottom row aligned).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import distributed
import hyperalign as ha_mod
import sampler
from hyperalign import Backbone, HyperAlign, HyperConfig

TOY = ("toy-sd", "toy-flux")
# the toy defaults, shared with evaluate.py's table; the toy SD's CFG scale is the one its U-Net was trained for
# (toy_train.py), and the toy FLUX is schnell-style, unguided
TOY_STEPS, TOY_LR, TOY_SD_CFG = 150, 3e-4, 5.0
# NOTE: λ and the part of the trajectory L_R is taken on are not published. L_R at a step of the later half only: from a
# high-noise state x̂0 is a blurred average, and a preference model scores its blur, not the image. The early steps,
# where the layout is decided, are then shaped by L_G (the preference data) alone. On the toy world this keeps the
# judge where L_R on every step lowers it (README, "HyperAlign on the toy world").
LAMBDA, REWARD_FROM = 3.0, 0.5


def first_reward_step(steps: int, reward_from: float) -> int:
    """The first sampling step (0 = the noisiest) at which L_R may be taken: `reward_from` of the way along."""
    return min(int(reward_from * steps), steps - 1)


# -------------------------------------------------------------------------------------------------------- pipeline

@dataclass
class Pipe:
    """The frozen pipeline around the backbone: prompts -> conditioning, sampling loop, latents <-> images."""
    backbone: Backbone
    vae: torch.nn.Module
    text: Callable                       # vp: prompts -> context (B, S, E); flow: prompts -> (txt, y)
    resolution: int
    steps: int
    guidance: float                      # vp: CFG scale; flow: distilled guidance (dev) or unused (schnell)
    shift: bool = True                   # flow: shifted schedule

    @property
    def kind(self) -> str:
        return self.backbone.kind

    def latent_hw(self) -> tuple[int, int]:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.resolution // f, self.resolution // f

    def conds(self, prompts: list[str]):
        """(cond, uncond) for a batch of prompts; uncond None when there is no classifier-free guidance."""
        if self.kind == "vp":
            ctx = self.text(prompts)
            return ctx, (self.text([""] * len(prompts)) if self.guidance > 1 else None)
        txt, y = self.text(prompts)
        h, w = self.latent_hw()
        g = self.guidance if self.backbone.model.config.guidance_embed else None
        return sampler.flux_cond(txt, y, sampler.image_ids(len(prompts), h, w, txt.device), g), None

    def noise(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        h, w = self.latent_hw()
        z = torch.randn(n, self.vae.config.latent_channels, h, w, generator=generator).to(device)
        return z if self.kind == "vp" else sampler.pack(z)

    def timesteps(self) -> list:
        if self.kind == "vp":
            return sampler.VPSchedule.timesteps(self.backbone.schedule, self.steps).tolist()
        h, w = self.latent_hw()
        return sampler.flow_timesteps(self.steps, h * w // 4, self.shift)[:-1].tolist()

    def t_batch(self, t, n: int, device) -> torch.Tensor:
        return torch.full((n,), t, device=device, dtype=torch.int64 if self.kind == "vp" else torch.float32)

    @torch.no_grad()
    def rollout(self, model: Callable, x_T: torch.Tensor, cond, uncond) -> dict:
        """-> {"t": [N], "x_t": (N+1, B, ...) from x_T to x_0, "x0_hat": (N, B, ...)}."""
        if self.kind == "vp":
            _, traj = sampler.ddim_sample(model, x_T, cond, self.backbone.schedule, self.steps, uncond=uncond,
                                          guidance=self.guidance, trajectory=True)
        else:
            _, traj = sampler.flow_sample(model, x_T, cond, self.steps, self.shift, trajectory=True)
        return dict(traj, t=traj["t"].tolist())

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space clean sample -> images (B, 3, H, W) in [0, 1] (differentiable)."""
        if self.kind == "flow":
            x0 = sampler.unpack(x0, *self.latent_hw())
        dtype = next(self.vae.parameters()).dtype
        return (self.vae.decode(x0.to(dtype)).float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> model-space x0."""
        z = self.vae.encode(images.to(next(self.vae.parameters()).dtype)).float()
        return z if self.kind == "vp" else sampler.pack(z)


def load_pipe(model: str, device, dtype, resolution: int | None, steps: int | None, guidance: float | None,
              tokenizer: str | None = None) -> Pipe:
    """--model: 'toy-sd', 'toy-flux', or a path to an SD1.x pipeline (folder / single file) or a FLUX folder."""
    import weights
    if model in TOY:
        import toy
        model = toy.SD_DIR if model == "toy-sd" else toy.FLUX_DIR
        resolution = resolution or toy.SIZE
    if os.path.isdir(model) and os.path.isdir(os.path.join(model, "transformer")):
        fp = weights.load_flux_pipeline(model, dtype=dtype, device=device)
        fp.transformer.requires_grad_(False)
        return Pipe(Backbone("flow", fp.transformer), fp.vae, fp.encode, resolution or 1024, steps or 28,
                    3.5 if guidance is None else guidance, fp.shift)
    sd = weights.load_sd(model, dtype=dtype, device=device, tokenizer=tokenizer)  # tokenizer: single-file SD
    return Pipe(Backbone("vp", sd.unet, sampler.VPSchedule.from_config(sd.scheduler)), sd.vae, sd.encode_prompt,
                resolution or 512, steps or 50, 7.5 if guidance is None else guidance)


# ------------------------------------------------------------------------------------------------------ data, eval

def step_generator(seed: int, step: int) -> torch.Generator:
    """All randomness of training step `step` comes from here: a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def pref_stream(reader, batch_size: int, resolution: int, skip_batches: int,
                ctx: distributed.Context = distributed.Context()) -> Iterator[dict]:
    """Endless batches of preferred images (epoch after epoch), the first `skip_batches` skipped (resume); under
    torchrun each rank gets its `batch_size` rows of every global batch of pairs."""
    import prefs
    def epochs():
        while True:
            pairs = distributed.deal(iter(reader), batch_size, ctx)
            n = 0
            for n, batch in enumerate(prefs.pref_batches(pairs, batch_size, resolution, drop_last=True), 1):
                yield batch
            if n == 0:
                raise ValueError(f"preference data {reader!r}: fewer pairs than one batch of {batch_size * ctx.world}")
    return itertools.islice(epochs(), skip_batches, None)


@torch.no_grad()
def evaluate(ha: HyperAlign, pipe: Pipe, reward, prompts: list[str], seed: int, judge=None, batch: int = 16) -> dict:
    """Reward (and the toy judge) of base and aligned samples from the same x_T: held-out prompts, fixed seeds (the
    noise of sample i is seeded with seed + batch start, so a repeated prompt gets new noise)."""
    device = ha.hypernet.proj.weight.device
    out = {"base": [], "aligned": []}
    for i in range(0, len(prompts), batch):
        p = prompts[i:i + batch]
        cond, uncond = pipe.conds(p)
        x_T = pipe.noise(len(p), torch.Generator().manual_seed(seed + i), device)
        base = pipe.rollout(lambda x, t, c: ha.predict(None, x, t, c), x_T, cond, uncond)["x_t"][-1]
        aligned = pipe.rollout(ha.sampler_model(cond), x_T, cond, uncond)["x_t"][-1]
        out["base"].append(pipe.decode(base))
        out["aligned"].append(pipe.decode(aligned))
    images = {k: torch.cat(v).float().cpu() for k, v in out.items()}
    scores = {f"reward_{k}": reward(v.to(device), prompts).float().cpu() for k, v in images.items()}
    if judge is not None:  # the toy world's ground truth: overall success, and each part (count, colour, ...)
        for k, v in images.items():
            parts = judge(v, prompts)
            scores[f"judge_{k}"] = parts["overall"].float()
            scores[f"judge_{k}_parts"] = {name: s.float().mean().item() for name, s in parts.items()}
    m = {k: v if isinstance(v, dict) else v.mean().item() for k, v in scores.items()}
    for name in ("reward", "judge"):
        if f"{name}_base" in scores:
            m.update(paired_change(name, scores[f"{name}_aligned"], scores[f"{name}_base"]))
    return m, images


def paired_change(name: str, aligned: torch.Tensor, base: torch.Tensor) -> dict:
    """Mean paired difference aligned - base over the (prompt, seed) samples and its standard error: base and aligned
    share x_T, so the paired error is the one that says whether a change is real (a success rate over 32 samples
    moves by 0.03 with one image)."""
    d = (aligned - base).double()
    se = d.std().item() / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {f"{name}_change": d.mean().item(), f"{name}_change_se": se}


def save_grid(images: dict, path: str, n: int = 8) -> None:
    from PIL import Image
    rows = torch.cat([images["base"][:n], images["aligned"][:n]])                  # (2n, 3, H, W)
    grid = rearrange(rows, "(r c) C H W -> (r H) (c W) C", r=2)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(path)


# ------------------------------------------------------------------------------------------------------ checkpoints

def atomic_write(path: str, write: Callable[[str], None]) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: str, ha: HyperAlign, opt, step: int, run: dict) -> None:
    """hypernet.safetensors + optim.pt + config.json, each written atomically; the step is in all three."""
    sd = {k: v.detach().contiguous().cpu() for k, v in ha.hypernet.state_dict().items()}
    atomic_write(os.path.join(out, "hypernet.safetensors"), lambda p: save_file(sd, p, metadata={"step": str(step)}))
    atomic_write(os.path.join(out, "optim.pt"), lambda p: torch.save({"step": step, "optim": opt.state_dict()}, p))
    cfg = {"hyper": ha.cfg.to_dict(), "step": step, "run": run}
    atomic_write(os.path.join(out, "config.json"), lambda p: open(p, "w").write(json.dumps(cfg, indent=2)))


load_hyperalign = ha_mod.load  # rebuild from DIR (hyperalign.py; sample.py --hyper uses it too)


# ---------------------------------------------------------------------------------------------------------- training

def start_step(variant: str, k: int, key_steps: list[int]) -> int:
    """The trajectory step whose state made the LoRA used at step k: S k, I 0, P the start of k's segment."""
    return {"S": k, "I": 0}.get(variant, max([s for s in key_steps if s <= k], default=0))


def calibrate(ha: HyperAlign, pipe: Pipe, prompts: list[str], k: int, seed: int) -> list[int]:
    """P: key steps from base trajectories over calibration prompts (fixed seed); stored in the config as times."""
    device = ha.hypernet.proj.weight.device
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(len(prompts), torch.Generator().manual_seed(seed), device)
    traj = pipe.rollout(lambda x, t, c: ha.predict(None, x, t, c), x_T, cond, uncond)
    steps = ha_mod.key_steps(traj["x0_hat"], k)
    ts = pipe.timesteps()
    ha.cfg.key_times = tuple(float(ts[i]) for i in steps)
    return steps


def train_step(ha: HyperAlign, pipe: Pipe, reward, prompts: list[str], pref: dict | None, lam: float,
               gen: torch.Generator, key_steps: list[int], rows: slice = slice(None), hypernet=None,
               reward_from: float = 0.0) -> dict:
    """One accumulated step over the batch; gradients land in ha.hypernet only. Returns logged scalars.

    L_R is taken at a step drawn uniformly from the trajectory from `reward_from` of the way along (0: every step);
    L_G at a step drawn from the whole schedule.

    Under torchrun `prompts` is the global batch and `rows` this rank's part: all randomness is drawn for the global
    batch and sliced, so the ranks together do what one process does with the whole batch; `pref` is already this
    rank's part. `hypernet`: ha.hypernet wrapped in DDP (gradients averaged over ranks in the last backward).
    """
    device = ha.hypernet.proj.weight.device
    net = ha.hypernet if hypernet is None else hypernet
    G, variant, bb = len(prompts), ha.cfg.variant, ha.backbone
    prompts = prompts[rows]
    B = len(prompts)
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(G, gen, device)[rows]
    traj = pipe.rollout(ha.sampler_model(cond), x_T, cond, uncond)                     # 1. no gradient
    ks = torch.randint(first_reward_step(pipe.steps, reward_from), pipe.steps, (G,), generator=gen)[rows].tolist()
    ts = traj["t"]
    if pref is not None:
        x0 = pipe.encode(pref["chosen"].to(device))
        eps = torch.randn((G, *x0.shape[1:]), generator=gen)[rows].to(device)
        kg = torch.randint(0, pipe.steps, (G,), generator=gen)[rows].tolist()
        pcond, _ = pipe.conds(pref["prompts"])
    log = {"loss_r": 0.0, "loss_g": 0.0, "reward": 0.0}
    with_g = pref is not None and lam != 0
    for i in range(B):
        row = slice(i, i + 1)
        c_i = ha_mod.cond_rows(cond, row)
        u_i = None if uncond is None else uncond[row]
        k, s = ks[i], start_step(variant, ks[i], key_steps)
        t_k, t_s = pipe.t_batch(ts[k], 1, device), pipe.t_batch(ts[s], 1, device)
        with distributed.sync_if(net, i == B - 1 and not with_g):                  # DDP: sync in the last backward
            factors = net(*bb.features(traj["x_t"][s][row], t_s, c_i))             # 2. with gradient: ha.factors
            with ha.substituted(factors):
                loss_r, r = ha_mod.reward_loss(ha, None, traj["x_t"][k][row], t_k, c_i, u_i, pipe.guidance,
                                               pipe.decode, reward, prompts[row])
                if not torch.isfinite(loss_r):
                    raise FloatingPointError(f"reward loss is {loss_r.item()}")
                (loss_r / B).backward()
        log["loss_r"] += loss_r.item() / B
        log["reward"] += r.mean().item() / B
        if not with_g:
            continue
        # 3. L_G at a random trajectory time; the LoRA comes from the noised state its variant would use
        k, s = kg[i], start_step(variant, kg[i], key_steps)
        t_k, t_s = pipe.t_batch(ts[k], 1, device), pipe.t_batch(ts[s], 1, device)
        pc_i = ha_mod.cond_rows(pcond, row)
        with distributed.sync_if(net, i == B - 1):
            factors = net(*bb.features(bb.noised(x0[row], eps[row], t_s), t_s, pc_i))
            with ha.substituted(factors):
                loss_g = ha_mod.regularisation_loss(ha, None, x0[row], eps[row], t_k, pc_i)
                if not torch.isfinite(loss_g):
                    raise FloatingPointError(f"regularisation loss is {loss_g.item()}")
                (lam * loss_g / B).backward()
        log["loss_g"] += loss_g.item() / B
    log["loss"] = log["loss_r"] + lam * log["loss_g"]
    return log


# -------------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", default="I", choices=ha_mod.VARIANTS, help="S every step, I once, P at key steps")
    p.add_argument("--model", default="toy-sd", help="toy-sd, toy-flux, or a path to SD1.5 / FLUX weights")
    p.add_argument("--preset", default=None, help="hypernetwork size preset (default: by model: toy-sd, toy-flux, "
                   f"sd15, flux-dev); one of {sorted(ha_mod.PRESETS)}")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder, for a single-file SD checkpoint")
    p.add_argument("--reward", default=None, help="reward spec 'name[:path][=w],...' (toy default: toy-pref)")
    p.add_argument("--reward-tokenizer", default=None, help="CLIP tokenizer folder for rewards without one (HPS)")
    p.add_argument("--prefs", default=None, help="preference data for L_G (toy default: the toy prefs.parquet)")
    p.add_argument("--lambda-reg", type=float, default=LAMBDA, help="λ, weight of L_G (0: reward only)")
    p.add_argument("--reward-from", type=float, default=REWARD_FROM,
                   help="L_R at steps from this fraction of the trajectory on (0: every step; 0.5: the later half)")
    p.add_argument("--steps", type=int, default=None, help="training steps (toy default 150, real 2000)")
    p.add_argument("--batch-size", type=int, default=4, help="per process (torchrun: N processes x this)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (toy 3e-4, real 1e-4)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank R (default: the preset's)")
    p.add_argument("--key-steps", type=int, default=3, help="P: number of curvature key steps K (plus step 0)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps (toy 20, SD 50, FLUX 28)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale (SD 7.5, toy 5) / distilled guidance (FLUX-dev 3.5)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--prompts", default=None, help="training prompts, one per line (toy: the 'hyper-train' split)")
    p.add_argument("--eval-prompts", default=None, help="held-out prompts, one per line (toy: the 'unseen' split, "
                   "then the 'heldout' split of new compositions)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out prompts evaluated at the end, per split "
                   "(toy: all of them, else 64)")
    p.add_argument("--eval-seeds", type=int, default=None, help="seeds per held-out prompt (toy 2, else 1)")
    p.add_argument("--eval-batch", type=int, default=None, help="samples per evaluation batch (toy 16; else "
                   "--batch-size: every sample holds its own merged weights)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/hyperalign", help="output folder DIR")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in DIR")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torchrun: cuda:LOCAL_RANK per process)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the frozen models (the hypernetwork trains in float32)")
    p.add_argument("--reward-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the reward model (bfloat16 halves its memory; HPS ViT-H: 3.7 -> 1.8 GiB)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (toy default 1; else torch's)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the frozen model")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    args = p.parse_args(argv)
    toy = args.model in TOY
    for name in ("steps", "batch_size", "n_eval", "eval_seeds", "eval_batch", "save_every", "key_steps",
                 "sample_steps", "rank", "resolution", "threads"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.lambda_reg < 0 or (args.lr is not None and not args.lr > 0):
        p.error("--lambda-reg must be >= 0 and --lr > 0")
    if not 0 <= args.reward_from < 1:
        p.error(f"--reward-from must be in [0, 1), got {args.reward_from}")
    if not toy and (args.reward is None or args.prompts is None):
        p.error("a real model needs --reward and --prompts (and --prefs unless --lambda-reg 0)")
    args.steps = args.steps if args.steps is not None else (TOY_STEPS if toy else 2000)
    args.lr = args.lr or (TOY_LR if toy else 1e-4)
    args.sample_steps = args.sample_steps or (20 if toy else None)
    args.eval_batch = args.eval_batch or (16 if toy else args.batch_size)
    args.eval_seeds = args.eval_seeds or (2 if toy else 1)
    if args.n_eval is None and not toy:
        args.n_eval = 64
    if toy and args.threads is None:
        args.threads = 1  # NOTE: toy-sized ops gain little from a 2nd thread and lose 10-30x when the cores are busy
    if toy and args.guidance is None and args.model == "toy-sd":
        args.guidance = TOY_SD_CFG
    return args


def read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"no such prompt file: {path}")
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    return lines


def run(args: argparse.Namespace, pipe: Pipe | None = None, reward=None, prefs_reader=None,
        prompts: list[str] | None = None, eval_prompts: list[str] | None = None, judge=None) -> dict:
    """Train per `args`; the objects may be passed in (tests build tiny random ones), else they are loaded."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx, device = distributed.init(args.device)       # torchrun: join the group (gloo / nccl); else no group
    dtype = getattr(torch, args.dtype)
    toy = args.model in TOY and pipe is None          # tests pass their own tiny pipe: no toy world then
    if pipe is None:
        pipe = load_pipe(args.model, device, dtype, args.resolution, args.sample_steps, args.guidance, args.tokenizer)
    extra_eval: dict[str, list[str]] = {}            # further held-out sets, reported under their own key
    if toy:
        import toy as toy_world
        # NOTE: the hypernetwork trains on 2/3 of the toy models' training prompts. It is scored on the other third
        # ('unseen': new prompts whose words and bindings the base model knows, like the paper's test prompts) and
        # then on the new compositions of the 'heldout' split, which the base model never saw either.
        prompts = prompts or toy_world.prompts("hyper-train")
        eval_prompts = eval_prompts or toy_world.eval_prompts("unseen", args.n_eval)
        extra_eval = {"heldout": toy_world.eval_prompts("heldout", args.n_eval)}
        judge = judge or toy_world.judge
    prompts = prompts or read_lines(args.prompts)
    eval_prompts = (eval_prompts or (read_lines(args.eval_prompts) if args.eval_prompts else prompts))[:args.n_eval]
    if reward is None:
        import rewards
        reward = rewards.parse_reward_spec(args.reward or "toy-pref", tokenizer=args.reward_tokenizer,
                                           device=device, dtype=getattr(torch, args.reward_dtype))
    if prefs_reader is None and args.lambda_reg > 0:
        import prefs
        if toy and not args.prefs:
            prefs_reader = toy_world.training_prefs()
        else:  # no evaluation prompt in L_G's data (a prompt that is also a training prompt stays)
            held = set(eval_prompts).union(*extra_eval.values()) - set(prompts)
            prefs_reader = prefs.Excluding(prefs.open_prefs(args.prefs or __import__("toy").PREFS_PATH), held)
    pipe.backbone.model.gradient_checkpointing = args.grad_ckpt
    if args.grad_ckpt:
        pipe.backbone.model.train()  # the U-Net checkpoints only in training mode (no dropout or batch norm in it)

    os.makedirs(args.out, exist_ok=True)
    preset = args.preset or ("toy-flux" if pipe.kind == "flow" and toy else "toy-sd" if toy else
                             "flux-dev" if pipe.kind == "flow" else "sd15")
    over = {"variant": args.variant, **({"rank": args.rank, "alpha": float(args.rank)} if args.rank else {})}
    cfg = HyperConfig.preset(preset, **over)
    if cfg.backbone != pipe.kind:
        raise ValueError(f"preset {preset!r} is for a {cfg.backbone!r} model, --model is {pipe.kind!r}")
    ha = HyperAlign(cfg, pipe.backbone).to(device)
    opt = torch.optim.AdamW(ha.hypernet.parameters(), lr=args.lr, weight_decay=0.0)
    run_info = {k: v for k, v in vars(args).items() if k not in ("resume",)}
    step, key = 0, []
    if args.resume:
        state, saved = _resume(args.out, ha, opt)
        step, key = saved["step"], saved["run"].get("key_steps", [])
        if ctx.main:
            print(f"resumed from {args.out} at step {step}")
    elif cfg.variant == "P":
        key = calibrate(ha, pipe, prompts[:16], args.key_steps, args.seed)
        key, ha.cfg.key_times = distributed.broadcast((key, ha.cfg.key_times), ctx)     # rank 0's, on every rank
        if ctx.main:
            print(f"P: key steps {key} (times {list(ha.cfg.key_times)})")
    run_info["key_steps"] = key
    if step == 0 and ctx.main:
        save_checkpoint(args.out, ha, opt, 0, run_info)
    net = distributed.wrap(ha.hypernet, ctx, device)  # DDP over the trainable part only; the frozen models are not

    pref_iter = (pref_stream(prefs_reader, args.batch_size, pipe.resolution, step, ctx)
                 if prefs_reader is not None and args.lambda_reg > 0 else None)
    log_path = os.path.join(args.out, "metrics.jsonl")
    if os.path.exists(log_path) and ctx.main:  # a fresh run starts a new log; a resumed one drops later lines
        with open(log_path) as f:
            kept = [ln for ln in f if args.resume and json.loads(ln)["step"] <= step]
        atomic_write(log_path, lambda p: open(p, "w").write("".join(kept)))
    bar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc=f"HyperAlign-{cfg.variant}",
               disable=not ctx.main)
    G = ctx.world * args.batch_size                   # the global batch: every rank draws it, each takes its rows
    for step in bar:
        gen = step_generator(args.seed, step)
        batch = [prompts[i] for i in torch.randint(0, len(prompts), (G,), generator=gen).tolist()]
        opt.zero_grad(set_to_none=True)
        t0 = time.time()
        try:
            log = train_step(ha, pipe, reward, batch, next(pref_iter) if pref_iter else None, args.lambda_reg,
                             gen, key, ctx.rows(args.batch_size), net, args.reward_from)
        except FloatingPointError as e:
            raise SystemExit(f"error: non-finite loss at step {step + 1} ({e}); stopped, the last good checkpoint "
                             f"is kept in {args.out}") from None
        torch.nn.utils.clip_grad_norm_(ha.hypernet.parameters(), 1.0)
        opt.step()
        log = distributed.mean(log, ctx)
        log.update(step=step + 1, sec=round(time.time() - t0, 3))
        if not ctx.main:                              # rank 0 alone logs and checkpoints
            continue
        with open(log_path, "a") as f:
            f.write(json.dumps(log) + "\n")
        bar.set_postfix(loss=f"{log['loss']:.4f}", reward=f"{log['reward']:.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(args.out, ha, opt, step + 1, run_info)

    metrics = {"variant": cfg.variant, "steps": args.steps, "key_steps": key,
               "trainable_params": sum(p.numel() for p in ha.hypernet.parameters())}
    distributed.close()
    if not args.no_eval and ctx.main:
        # every copy of a prompt starts from its own x_T; per-sample weights: memory grows with the batch
        m, images = evaluate(ha, pipe, reward, eval_prompts * args.eval_seeds, seed=10_000 + args.seed, judge=judge,
                             batch=args.eval_batch)
        metrics.update(m)
        for name, extra in extra_eval.items():
            metrics[name] = evaluate(ha, pipe, reward, extra * args.eval_seeds, seed=20_000 + args.seed,
                                     judge=judge, batch=args.eval_batch)[0]
        save_grid(images, os.path.join(args.out, "samples.png"))
        atomic_write(os.path.join(args.out, "metrics.json"),
                     lambda p: open(p, "w").write(json.dumps(metrics, indent=2)))
        print(json.dumps(metrics))
    return metrics


def _resume(out: str, ha: HyperAlign, opt) -> tuple[dict, dict]:
    paths = [os.path.join(out, f) for f in ("config.json", "hypernet.safetensors", "optim.pt")]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"--resume: no checkpoint in {out} (missing {missing})")
    with open(paths[0]) as f:
        saved = json.load(f)
    state = torch.load(paths[2], weights_only=True)
    sd = load_file(paths[1])
    if state["step"] != saved["step"]:
        raise ValueError(f"--resume: checkpoint files in {out} disagree (steps {saved['step']} vs {state['step']})")
    mine, theirs = ha.cfg.to_dict(), dict(saved["hyper"])
    mine.pop("key_times"), theirs.pop("key_times", None)
    if {k: list(v) if isinstance(v, tuple) else v for k, v in mine.items()} != theirs:
        raise ValueError(f"--resume: the checkpoint in {out} has a different hypernetwork config {theirs}")
    ha.cfg.key_times = tuple(saved["hyper"]["key_times"])
    ha.hypernet.load_state_dict(sd, strict=True)
    opt.load_state_dict(state["optim"])
    return state, saved


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # bad user input: paths, specs, checkpoints (WeightsError, PrefsError are ValueErrors)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
