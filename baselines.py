"""The baselines HyperAlign is compared with, on the same frozen pipeline (train.Pipe), the same reward and the same
loss pieces (hyperalign.reward_loss / regularisation_loss). Each is a plain function or loop.

  static LoRA   reward fine-tuning of ONE fixed set of LoRA factors (AlignProp / DRaFT family): the same targets,
                rank and loss L_R + λ L_G as HyperAlign, no hypernetwork. The paper's main contrast: fixed weights
                for every input vs weights generated from (x_t, t, c).
  Best-of-N     N base samples per prompt, keep the one the reward scores highest (test-time, N x the cost).
  guidance      gradient guidance on the latent through the one-step prediction (FreeDoM / DyMO-style test-time
                alignment): after every sampler step, x_{t-1} += ρ·(step size)·∇_{x_t} r(D(x0_hat(x_t))) / |∇|.
  Direct-Align  (flow only; SRPO, seed 002) a static LoRA trained by injecting a known noise ε into a rolled-out
                x0 at time σ, one model step with gradient, x0_hat recovered with the known ε, scored by SRPO's
                relative reward.

Shape alphabet: B samples, N candidates (Best-of-N), R rank, I / O in / out features; latents x as the pipe's model
space ((B, C, H, W) for VP, packed tokens (B, L, C) for flow).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

import hyperalign as H
import lora
import sampler
import train
from hyperalign import Backbone, HyperConfig


# ------------------------------------------------------------------------------------------------------- static LoRA

class StaticLoRA(nn.Module):
    """One set of LoRA factors {target: (A (R, I), B (O, R))} for every input: Δθ = s·B·A, B = 0 at init (Δθ = 0).

    It offers HyperAlign's `predict(factors, x_t, t, cond)` and `backbone`, so hyperalign.reward_loss and
    regularisation_loss apply to it unchanged: the two methods differ only in where Δθ comes from.
    """
    def __init__(self, cfg: HyperConfig, backbone: Backbone):
        super().__init__()
        targets = H.frozen_targets(cfg, backbone)
        self.cfg, self.backbone = cfg, backbone
        self.names = [t.name for t in targets]
        R = cfg.rank
        # NOTE: A is random and B zero (the usual LoRA init, Hu et al. 2021), so the model starts as the base model,
        # as HyperAlign's does.
        self.A = nn.ParameterList([nn.Parameter(torch.randn(R, t.in_features) / math.sqrt(t.in_features))
                                   for t in targets])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(t.out_features, R)) for t in targets])

    def factors(self) -> lora.Factors:
        return {n: (A, B) for n, A, B in zip(self.names, self.A, self.B)}

    def predict(self, factors: lora.Factors | None, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """f_{θ+Δθ}(x_t, t, cond) with one unbatched set of factors for the whole batch (None: the base model)."""
        params = None if factors is None else lora.merged_params(self.backbone.model, factors, self.cfg.scale)
        return self.backbone.forward(params, x_t, t, cond)

    def sampler_model(self, cond=None) -> Callable:
        """The model callable for the samplers: weights merged once (a static LoRA costs nothing per step)."""
        with torch.no_grad():
            params = lora.merged_params(self.backbone.model, self.factors(), self.cfg.scale)
        return lambda x_t, t, c: self.backbone.forward(params, x_t, t, c)


def _times(pipe: train.Pipe, values: list, device) -> Tensor:
    return torch.tensor(values, device=device, dtype=torch.int64 if pipe.kind == "vp" else torch.float32)


def static_lora_step(sl: StaticLoRA, pipe: train.Pipe, reward, prompts: list[str], pref: dict | None, lam: float,
                     gen: torch.Generator, reward_from: float = 0.0) -> dict:
    """One step of reward fine-tuning with the loss HyperAlign uses (train.train_step), batched: one LoRA for all.

    Roll out with the current LoRA (no gradient), pick a random step k per sample (from `reward_from` of the way
    along, as train.train_step), L_R on the one-step prediction at
    x_k (CFG as in sampling); L_G on noised preferred images at a random trajectory time. Backward into A, B only.
    """
    device = sl.A[0].device
    B = len(prompts)
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(B, gen, device)
    traj = pipe.rollout(sl.sampler_model(), x_T, cond, uncond)
    ks = torch.randint(train.first_reward_step(pipe.steps, reward_from), pipe.steps, (B,), generator=gen)
    x_k = traj["x_t"][ks, torch.arange(B)]                                        # (B, ...) each at its own step
    t_k = _times(pipe, [traj["t"][k] for k in ks.tolist()], device)
    loss_r, r = H.reward_loss(sl, sl.factors(), x_k, t_k, cond, uncond, pipe.guidance, pipe.decode, reward, prompts)
    log = {"loss_r": loss_r.item(), "reward": r.mean().item(), "loss_g": 0.0}
    loss = loss_r
    if pref is not None and lam > 0:
        x0 = pipe.encode(pref["chosen"].to(device))
        eps = torch.randn(x0.shape, generator=gen).to(device)
        kg = torch.randint(0, pipe.steps, (x0.shape[0],), generator=gen).tolist()
        pcond, _ = pipe.conds(pref["prompts"])
        loss_g = H.regularisation_loss(sl, sl.factors(), x0, eps, _times(pipe, [traj["t"][k] for k in kg], device),
                                       pcond)
        loss = loss + lam * loss_g
        log["loss_g"] = loss_g.item()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"static LoRA loss is {loss.item()}")
    loss.backward()
    log["loss"] = loss.item()
    return log


# ------------------------------------------------------------------------------------------------------ Direct-Align

def direct_align_x0(x_t: Tensor, v: Tensor, eps: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Direct-Align's recovery (SRPO, seed 002): one Euler step x_{t'} = x_t + (t' − t) v, then the clean sample
    from the *known* injected noise, x0_hat = (x_{t'} − t' ε) / (1 − t'). Exact (= x0) when v = ε − x0.
    t, t_next: (B,) flow times, t_next < t < 1."""
    shape = (-1, *[1] * (x_t.dim() - 1))
    t, t_next = t.view(shape).to(x_t.dtype), t_next.view(shape).to(x_t.dtype)
    x_next = x_t + (t_next - t) * v
    return (x_next - t_next * eps) / (1 - t_next)


class SRPORelative(nn.Module):
    """SRPO's semantic relative reward for any text-conditioned reward r: (1+k)·r(x, p+ · c) − r(x, p− · c), the
    control words prepended to the prompt. For a CLIP-cosine reward this equals rewards.RelativeReward's
    f_img·((1+k) f_txt(p+) − f_txt(p−)) (which `srpo_reward` uses there); NOTE: the generalisation to non-linear
    text heads (the toy preference model) is ours."""
    def __init__(self, reward, positive: str = "Realistic photo.", negative: str = "Painting.", k: float = 1.0):
        super().__init__()
        self.reward, self.positive, self.negative, self.k = reward, positive, negative, k

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        pos = self.reward(images, [f"{self.positive} {p}" for p in prompts])
        neg = self.reward(images, [f"{self.negative} {p}" for p in prompts])
        return (1 + self.k) * pos - neg


def srpo_reward(reward, k: float = 1.0):
    """SRPO's relative reward around `reward` (or the only part of a rewards.WeightedSum): rewards.RelativeReward for
    a CLIP-style reward, SRPORelative otherwise. NOTE: k is not published in the abstract; ours k = 1, so the score
    is the plain reward plus the control-word difference ("Realistic photo." vs "Painting.")."""
    import rewards
    if isinstance(reward, rewards.WeightedSum):
        if len(reward.rewards) != 1:
            raise ValueError("SRPO's relative reward wraps one reward; the spec has several")
        reward = next(iter(reward.rewards.values()))
    if isinstance(reward, rewards.CLIPReward):
        return rewards.RelativeReward(reward, k=k)
    return SRPORelative(reward, k=k)


def direct_align_step(sl: StaticLoRA, pipe: train.Pipe, reward, prompts: list[str], gen: torch.Generator) -> dict:
    """One Direct-Align step for a flow model: x0 rolled out with the current LoRA (no gradient), ε ~ N(0, I) injected
    at a trajectory time σ = t_k, one modulated model step with gradient to t_{k+1}, x0_hat from the known ε, L = −r.

    NOTE: SRPO's inversion branch (swapped prompts) and its timestep-dependent discount are left out; the time is
    drawn uniformly from the sampler's own schedule, so early (noisy) steps get reward gradients too.
    """
    if pipe.kind != "flow":
        raise ValueError("Direct-Align is implemented for rectified-flow models (FLUX)")
    device = sl.A[0].device
    B = len(prompts)
    cond, _ = pipe.conds(prompts)
    x0 = pipe.rollout(sl.sampler_model(), pipe.noise(B, gen, device), cond, None)["x_t"][-1]
    h, w = pipe.latent_hw()
    ts = sampler.flow_timesteps(pipe.steps, h * w // 4, pipe.shift).tolist()      # (N + 1,) from 1 to 0
    ks = torch.randint(0, pipe.steps, (B,), generator=gen).tolist()
    t, t_next = _times(pipe, [ts[k] for k in ks], device), _times(pipe, [ts[k + 1] for k in ks], device)
    eps = torch.randn(x0.shape, generator=gen).to(device)
    x_t = sl.backbone.noised(x0, eps, t)
    v = sl.predict(sl.factors(), x_t, t, cond)
    r = reward(pipe.decode(direct_align_x0(x_t, v, eps, t, t_next)), prompts)
    loss = -r.mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"Direct-Align loss is {loss.item()}")
    loss.backward()
    return {"loss": loss.item(), "reward": r.mean().item()}


def train_static(pipe: train.Pipe, reward, prompts: list[str], cfg: HyperConfig, steps: int, batch_size: int = 4,
                 lr: float = 1e-3, lam: float = 1.0, prefs_reader=None, method: str = "reward", seed: int = 0,
                 out: str | None = None, device=None, reward_from: float = 0.0) -> tuple[StaticLoRA, list[dict]]:
    """Train a static LoRA with `method` "reward" (L_R + λ L_G, like HyperAlign) or "direct-align" (flow; `reward` is
    used as given: pass srpo_reward(...) for SRPO). Same prompt batches, AdamW, clipping and step seeds as train.py,
    so runs with equal steps are matched. Saves DIR/static_lora.safetensors + DIR/config.json when `out` is given."""
    if method not in ("reward", "direct-align"):
        raise ValueError(f"method must be 'reward' or 'direct-align', got {method!r}")
    device = device or next(pipe.backbone.model.parameters()).device
    torch.manual_seed(seed)
    sl = StaticLoRA(cfg, pipe.backbone).to(device)
    opt = torch.optim.AdamW(sl.parameters(), lr=lr, weight_decay=0.0)
    prefs = (train.pref_stream(prefs_reader, batch_size, pipe.resolution, 0)
             if method == "reward" and prefs_reader is not None and lam > 0 else None)
    logs = []
    for step in tqdm(range(steps), desc=f"static LoRA ({method})"):
        gen = train.step_generator(seed, step)
        batch = [prompts[i] for i in torch.randint(0, len(prompts), (batch_size,), generator=gen).tolist()]
        opt.zero_grad(set_to_none=True)
        if method == "reward":
            log = static_lora_step(sl, pipe, reward, batch, next(prefs) if prefs else None, lam, gen, reward_from)
        else:
            log = direct_align_step(sl, pipe, reward, batch, gen)
        torch.nn.utils.clip_grad_norm_(sl.parameters(), 1.0)
        opt.step()
        logs.append({"step": step + 1, **log})
    if out is not None:
        save_static(out, sl, {"method": method, "steps": steps, "batch_size": batch_size, "lr": lr, "lambda": lam,
                              "reward_from": reward_from, "seed": seed})
    return sl, logs


def save_static(out: str, sl: StaticLoRA, run: dict) -> None:
    os.makedirs(out, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in sl.state_dict().items()}
    train.atomic_write(os.path.join(out, "static_lora.safetensors"), lambda p: save_file(sd, p))
    cfg = {"hyper": sl.cfg.to_dict(), "run": run}
    train.atomic_write(os.path.join(out, "config.json"), lambda p: open(p, "w").write(json.dumps(cfg, indent=2)))


def load_static(out: str, backbone: Backbone, device=None) -> tuple[StaticLoRA, dict]:
    """Rebuild a static LoRA from DIR (config.json + static_lora.safetensors), strictly."""
    path = os.path.join(out, "config.json")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(out, "static_lora.safetensors")):
        raise ValueError(f"no static LoRA checkpoint (config.json + static_lora.safetensors) in {out}")
    with open(path) as f:
        cfg = json.load(f)
    sl = StaticLoRA(HyperConfig(**cfg["hyper"]), backbone)
    sl.load_state_dict(load_file(os.path.join(out, "static_lora.safetensors")), strict=True)
    return (sl.to(device) if device is not None else sl), cfg


# -------------------------------------------------------------------------------------------------- test-time methods

def base_model(pipe: train.Pipe) -> Callable:
    return lambda x_t, t, c: pipe.backbone.forward(None, x_t, t, c)


@torch.no_grad()
def best_of_n(pipe: train.Pipe, reward, prompts: list[str], x_T: Tensor, model: Callable | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Best-of-N: x_T (N, B, ...) candidate noises; sample each with the base model, keep the best by `reward`.
    Returns (images (B, 3, H, W), scores (N, B), picked (B,) candidate index)."""
    model = model or base_model(pipe)
    cond, uncond = pipe.conds(prompts)
    images, scores = [], []
    for x in x_T:
        img = pipe.decode(pipe.rollout(model, x, cond, uncond)["x_t"][-1])
        images.append(img)
        scores.append(reward(img, prompts).float())
    images, scores = torch.stack(images), torch.stack(scores)                     # (N, B, 3, H, W), (N, B)
    picked = scores.argmax(0)                                                     # (B,)
    return images[picked, torch.arange(len(prompts))], scores, picked


def guidance_sample(pipe: train.Pipe, reward, prompts: list[str], x_T: Tensor, rho: float = 1.0,
                    model: Callable | None = None, trajectory: bool = False):
    """Gradient guidance through the one-step prediction (FreeDoM, Yu et al. 2023; DyMO's test-time alignment):

        g_t     = ∇_{x_t} r(D(x0_hat(x_t)), c)          through the (CFG-guided) model, decoder and reward
        x_{t-1} = step(x_t) + ρ · |step(x_t) − x_t| · g_t / |g_t|   (per sample)

    NOTE: FreeDoM scales ρ_t by the gradient norm; ours scales the unit gradient by the sampler's own step length, so ρ
    is dimensionless (the same ρ works for VP and flow). FreeDoM's time-travel (re-noising) is left out.
    Returns the final latent x_0 (model space), or (x_0, traj) with the x_t list like the samplers'.
    """
    model = model or base_model(pipe)
    bb = pipe.backbone
    cond, uncond = pipe.conds(prompts)
    if pipe.kind == "vp":
        ts = pipe.timesteps()
        stride = bb.schedule.T // pipe.steps                                     # as sampler.ddim_sample
        pairs = [(t, t - stride) for t in ts]
    else:
        h, w = pipe.latent_hw()
        ts = sampler.flow_timesteps(pipe.steps, h * w // 4, pipe.shift).tolist()
        pairs = list(zip(ts[:-1], ts[1:]))
    x_t, xs = x_T, [x_T]
    for t, t_next in pairs:
        t_b = _times(pipe, [t] * x_t.shape[0], x_t.device)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            pred = sampler.guided(model, x, t_b, cond, uncond, pipe.guidance)
            r = reward(pipe.decode(bb.x0_hat(x, t_b, pred)), prompts)
            g, = torch.autograd.grad(r.sum(), x)
        pred = pred.detach()
        if pipe.kind == "vp":
            x_next, _ = sampler.ddim_step(x_t, pred, t, t_next, bb.schedule)
        else:
            x_next, _ = sampler.flow_step(x_t, pred, t, t_next)
        norm = lambda z: z.flatten(1).norm(dim=1).view(-1, *[1] * (z.dim() - 1))  # noqa: E731  (B, 1, ...)
        x_t = x_next + rho * norm(x_next - x_t) * g / norm(g).clamp_min(1e-12)
        xs.append(x_t)
    return (x_t, {"x_t": torch.stack(xs)}) if trajectory else x_t


# -------------------------------------------------------------------------------------------------------------- main

def main(argv=None) -> None:
    """`python baselines.py --method reward|direct-align [train.py's arguments]`: train a static LoRA baseline into
    DIR (static_lora.safetensors + config.json), with train.py's data, reward, step and optimiser arguments.
    direct-align (flow models) trains on SRPO's relative reward around --reward."""
    import argparse
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method", default="reward", choices=("reward", "direct-align"))
    known, rest = p.parse_known_args(argv)
    args = train.parse_args(rest)
    try:
        import prefs
        import rewards
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        if args.threads:
            torch.set_num_threads(args.threads)
        pipe = train.load_pipe(args.model, device, dtype, args.resolution, args.sample_steps, args.guidance)
        toy = args.model in train.TOY
        if toy:
            import toy as toy_world
        prompts = toy_world.prompts("hyper-train") if toy else train.read_lines(args.prompts)  # as train.py
        reward = rewards.parse_reward_spec(args.reward or "toy-pref", tokenizer=args.reward_tokenizer, device=device)
        reader = None
        if known.method == "direct-align":
            reward = srpo_reward(reward)
        elif args.lambda_reg > 0:
            reader = (toy_world.training_prefs() if toy and not args.prefs else
                      prefs.open_prefs(args.prefs or toy_world.PREFS_PATH))  # as train.py
        preset = args.preset or (("toy-flux" if toy else "flux-dev") if pipe.kind == "flow" else
                                 ("toy-sd" if toy else "sd15"))
        cfg = HyperConfig.preset(preset, **({"rank": args.rank, "alpha": float(args.rank)} if args.rank else {}))
        train_static(pipe, reward, prompts, cfg, args.steps, args.batch_size, args.lr, args.lambda_reg, reader,
                     known.method, args.seed, out=args.out, device=device, reward_from=args.reward_from)
    except ValueError as e:  # bad user input: paths, specs, a VP model for direct-align
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
