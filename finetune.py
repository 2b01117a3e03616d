"""The paper's fine-tuning baselines, each a LoRA on the frozen model (methods.StaticLoRA: the static LoRA's targets
and rank) trained with its authors' loss (../shared/baselines-notes.md names the files the facts come from):

    Diffusion-DPO  (Wallace et al. 2024)  preference pairs, winner and loser noised with the same t and noise:
                   loss = −log σ(−β/2 ((L_θ(w) − L_θ(l)) − (L_ref(w) − L_ref(l)))),  L = ‖f(x_t) − target‖² per sample
    Diffusion-KTO  (Li et al. 2024)       single images labelled desirable / undesirable, g = L_ref − L_θ,
                   z = max(0, mean g) (no gradient), loss = λ_y (1 − σ(sign(y) β (g − z)))
    GRPO           (DDPO, Black et al. 2024 for VP; Flow-GRPO, Liu et al. 2025 for flow)  a group of G samples per
                   prompt from a stochastic sampler that records each step's log-probability, advantages normalised
                   within each group, then the PPO-clipped ratio of the log-probabilities under the current LoRA,
                   optionally a KL to the base model: ‖μ_θ − μ_ref‖² / (2 std²) (Flow-GRPO)

The reference (DPO, KTO, GRPO's KL) is the frozen base model: the LoRA switched off. Each `*_step` takes one
optimisation step's loss for a batch and calls backward, with the contract of losses.training_step: gradients land in
the LoRA's factors only, and the returned dict of scalars is what metrics.jsonl logs.
Shape alphabet: B batch, G group size, N sampling steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import distributed
import sampler
from backbone import Backbone


# ------------------------------------------------------------------------------------------------------------- losses

def dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """Diffusion-DPO's loss per pair (its train.py): the denoising errors (B,) of the model and the reference on the
    winner and the loser, noised with the same t and noise. Lower error on the winner than the reference has, and
    higher on the loser, lowers it."""
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside)


def kto_loss(err: Tensor, ref_err: Tensor, desirable: Tensor, beta: float, lambdas=(1.0, 1.0)) -> Tensor:
    """Diffusion-KTO's loss per image (its train_kto_sd_v1.5.py): g = L_ref − L_θ, the reference point z = the batch
    mean of g clamped at 0 (no gradient), h = σ(±β (g − z)) (+ for a desirable image, − for an undesirable one),
    loss = λ_y (1 − h); λ = (desirable, undesirable) weights."""
    g = ref_err - err
    z = g.mean().clamp_min(0).detach()
    sign = desirable.float() * 2 - 1
    lam = torch.where(desirable, torch.tensor(lambdas[0]), torch.tensor(lambdas[1])).to(g)
    return lam * (1 - torch.sigmoid(sign * beta * (g - z)))


def group_advantages(rewards: Tensor, group: int, clip: float = 5.0) -> Tensor:
    """GRPO's advantages: each reward minus its group's mean, over the group's standard deviation (+ 1e-4), clipped to
    ±clip (DDPO / Flow-GRPO clip at 5). rewards (B G,) with the G samples of a prompt adjacent."""
    r = rewards.view(-1, group).double()
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-4)
    return a.clamp(-clip, clip).view(-1).to(rewards.dtype)


def ppo_loss(logp: Tensor, logp_old: Tensor, adv: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (DDPO / Flow-GRPO): max(−A r, −A clip(r, 1 − ε, 1 + ε)) with r = exp(logp − logp_old),
    per sample; -> (loss (B,), the share of samples whose ratio was clipped)."""
    ratio = torch.exp(logp - logp_old)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    return loss, ((ratio - 1).abs() > clip).float().mean()


# ------------------------------------------------------------------------------------------------------------- steps

def _errors(model, bb: Backbone, x0: Tensor, eps: Tensor, t: Tensor, cond) -> Tensor:
    """Per-sample denoising error ‖f(x_t, t, c) − target‖², mean over every dimension but the batch: (B,)."""
    pred = model(bb.noised(x0, eps, t), t, cond)
    return (pred.float() - bb.target(x0, eps, t).float()).square().flatten(1).mean(1)


def _noise_draw(pipe, n: int, gen: torch.Generator, shape) -> tuple[Tensor, Tensor]:
    """One t and one noise per sample, over the model's whole training range (VP: t ~ U{0..T-1}; flow: t ~ U(0, 1))."""
    bb = pipe.backbone
    if bb.kind == "vp":
        t = torch.randint(0, bb.schedule.T, (n,), generator=gen)
    else:
        t = torch.rand(n, generator=gen)
    return t.to(pipe.device, bb.t_dtype), torch.randn((n, *shape), generator=gen).to(pipe.device)


def step(cfg, method, pipe, reward, prompts: list[str], pref: dict | None, gen: torch.Generator, net=None) -> dict:
    """One step of cfg.objective ("dpo", "kto", "grpo") with its settings; `net` the LoRA wrapped for DDP."""
    if cfg.objective == "dpo":
        return dpo_step(method, pipe, pref, cfg.beta or 5000.0, gen, net)
    if cfg.objective == "kto":
        return kto_step(method, pipe, pref, cfg.beta or 1000.0, gen, net)
    if cfg.objective == "grpo":
        eta = cfg.grpo_eta or (1.0 if pipe.kind == "vp" else 0.7)
        return grpo_step(method, pipe, reward, prompts, gen, cfg.grpo_group, eta, cfg.grpo_clip, cfg.grpo_kl,
                         cfg.grpo_fraction, net)
    raise ValueError(f"objective must be dpo, kto or grpo here, got {cfg.objective!r}")


def dpo_step(method, pipe, pref: dict, beta: float, gen: torch.Generator, net=None) -> dict:
    """One Diffusion-DPO step on a batch of preference pairs (this rank's rows)."""
    bb = pipe.backbone
    x_w, x_l = pipe.encode(pref["chosen"].to(pipe.device)), pipe.encode(pref["rejected"].to(pipe.device))
    t, eps = _noise_draw(pipe, len(pref["prompts"]), gen, x_w.shape[1:])
    cond, _ = pipe.conds(pref["prompts"])
    both = lambda m: _errors(m, bb, torch.cat([x_w, x_l]), torch.cat([eps, eps]), torch.cat([t, t]),  # noqa: E731
                             _twice(cond)).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = both(bb)
    with method.applied(method.factors(net=net)) as model:
        err_w, err_l = both(model)
        loss = dpo_loss(err_w, err_l, ref_w, ref_l, beta).mean()
        loss.backward()
    margin = ((ref_w - err_w) - (ref_l - err_l)).mean().item()                    # > 0: the model prefers the winner
    return {"loss": loss.item(), "implicit_margin": margin, "reward": 0.0}


def kto_step(method, pipe, pref: dict, beta: float, gen: torch.Generator, net=None) -> dict:
    """One Diffusion-KTO step: every pair's chosen image labelled desirable, its rejected one undesirable."""
    bb = pipe.backbone
    x0 = torch.cat([pipe.encode(pref["chosen"].to(pipe.device)), pipe.encode(pref["rejected"].to(pipe.device))])
    n = len(pref["prompts"])
    desirable = torch.arange(2 * n) < n
    t, eps = _noise_draw(pipe, 2 * n, gen, x0.shape[1:])
    cond = _twice(pipe.conds(pref["prompts"])[0])
    with torch.no_grad():
        ref = _errors(bb, bb, x0, eps, t, cond)
    with method.applied(method.factors(net=net)) as model:
        loss = kto_loss(_errors(model, bb, x0, eps, t, cond), ref, desirable.to(pipe.device), beta).mean()
        loss.backward()
    return {"loss": loss.item(), "reward": 0.0}


def _twice(cond):
    """The conditioning of a batch stacked twice (the winner's and the loser's copies)."""
    if isinstance(cond, dict):
        return {k: (torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in cond.items()}
    return torch.cat([cond, cond])


def sample_with_logprob(model, pipe, x_T: Tensor, cond, uncond, eta: float, gen: torch.Generator | None = None
                        ) -> dict:
    """A trajectory of the stochastic sampler (VP: DDIM with η, DDPO; flow: Flow-GRPO's SDE, noise level η),
    recording each step: {"x_t": (N+1, B, ...), "logp": (N, B), "t": [N] pairs (t, t_next)}, without gradient."""
    bb, pairs = pipe.backbone, pipe.pairs()
    xs, lps = [x_T], []
    with torch.no_grad():
        x = x_T
        for t, t_next in pairs:
            tb, tn = pipe.t_batch(t, len(x)), pipe.t_batch(t_next, len(x))
            pred = sampler.guided(model, x, tb, cond, uncond, pipe.guidance)
            x, lp, _, _ = bb.step_logprob(x, pred, tb, tn, eta, gen, t_cap=pairs[0][1])
            xs.append(x)
            lps.append(lp)
    return {"x_t": torch.stack(xs), "logp": torch.stack(lps), "t": pairs}


def grpo_step(method, pipe, reward, prompts: list[str], gen: torch.Generator, group: int, eta: float, clip: float,
              kl: float, fraction: float, net=None) -> dict:
    """One GRPO step: `group` samples of every prompt from the stochastic sampler with the current LoRA (the old
    policy), scored by `reward`; advantages within each prompt's group; then at a random `fraction` of the steps
    (DanceGRPO's timestep fraction; DDPO trains on all) the PPO loss of the new log-probabilities, plus
    kl · ‖μ_θ − μ_ref‖² / (2 std²) when kl > 0 (Flow-GRPO). One optimisation step per batch, so the first (and only)
    inner step has ratio 1 and clips nothing; several inner steps would reuse the same trajectories."""
    import sampler
    bb = pipe.backbone
    ps = [p for p in prompts for _ in range(group)]                                   # (B G): a prompt's G adjacent
    cond, uncond = pipe.conds(ps)
    x_T = pipe.noise(len(ps), gen)
    traj = sample_with_logprob(method.sampler_model(cond, pipe.steps), pipe, x_T, cond, uncond, eta, gen)
    with torch.no_grad():
        r = reward(pipe.decode(traj["x_t"][-1]), ps).float()
    adv = group_advantages(r, group).to(pipe.device)
    N = len(traj["t"])
    steps = torch.randperm(N, generator=gen)[:max(1, round(fraction * N))].tolist()
    log = {"loss": 0.0, "reward": r.mean().item(), "clipped": 0.0, "kl": 0.0, "ratio_dev": 0.0}
    t_cap = traj["t"][0][1]
    for k in steps:
        t, t_next = traj["t"][k]
        tb, tn = pipe.t_batch(t, len(ps)), pipe.t_batch(t_next, len(ps))
        x, x_next = traj["x_t"][k], traj["x_t"][k + 1]
        with distributed.sync_if(net, k == steps[-1]), method.applied(method.factors(net=net)) as model:
            pred = sampler.guided(model, x, tb, cond, uncond, pipe.guidance)
            _, logp, mean, std = bb.step_logprob(x, pred, tb, tn, eta, x_next=x_next, t_cap=t_cap)
            loss, clipped = ppo_loss(logp, traj["logp"][k], adv, clip)
            log["ratio_dev"] = max(log["ratio_dev"], (logp - traj["logp"][k]).exp().sub(1).abs().max().item())
            loss = loss.mean()
            if kl > 0:
                with torch.no_grad():
                    ref = sampler.guided(bb, x, tb, cond, uncond, pipe.guidance)
                    _, _, mean_ref, _ = bb.step_logprob(x, ref, tb, tn, eta, x_next=x_next, t_cap=t_cap)
                d = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * std.flatten(1).mean(1) ** 2)
                loss = loss + kl * d.mean()
                log["kl"] += d.mean().item() / len(steps)
            (loss / len(steps)).backward()
        log["loss"] += loss.item() / len(steps)
        log["clipped"] += clipped.item() / len(steps)
    return log
