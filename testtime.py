"""The test-time methods the paper compares HyperAlign with: more compute per sample at sampling time, no training.

    best_of_n         N base samples per prompt, keep the one the reward scores highest (N x the cost)
    guidance_sample   gradient guidance through the one-step prediction at every step (FreeDoM-like, no time travel)
    epsilon_greedy    ε-greedy noise search (Ramesh & Mardani 2025, rvignav/diffusion-tts): at every stochastic step
                      K rounds of N candidate noises, each scored by one more model call -> x̂0 -> reward
    freedom           FreeDoM (Yu et al. 2023, vvictoryuki/FreeDoM) as published: the reward's gradient on the
                      DDPM posterior sample inside a window of steps, ρ from the CFG correction's size, and time
                      travel (re-noising back to t and stepping again) in the middle of the window

Shape alphabet: B samples, N candidates; latents x in the pipeline's model space.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

import sampler
from pipeline import Pipeline


@torch.no_grad()
def best_of_n(pipe: Pipeline, reward, prompts: list[str], x_T: Tensor, model: Callable | None = None
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Best-of-N: x_T (N, B, ...) candidate noises; sample each with the base model, keep the best by `reward`.
    Returns (images (B, 3, H, W), scores (N, B), picked (B,) candidate index)."""
    images = torch.stack([pipe.generate(prompts, x, model) for x in x_T])          # (N, B, 3, H, W)
    scores = torch.stack([reward(img, prompts).float() for img in images])        # (N, B)
    picked = scores.argmax(0)                                                     # (B,)
    return images[picked, torch.arange(len(prompts))], scores, picked


def _x0_reward(pipe: Pipeline, reward, prompts: list[str], x: Tensor, t: Tensor, pred: Tensor) -> Tensor:
    """The reward of the one-step prediction's decode: r(D(x̂0(x_t)), c), (B,)."""
    return reward(pipe.decode(pipe.backbone.x0_hat(x, t, pred), clamp=False), prompts)


def _each(v: Tensor, like: Tensor) -> Tensor:
    """A (B,) tensor of per-sample values (any dtype) viewed as (B, 1, ...) to broadcast against `like`."""
    return v.view(-1, *[1] * (like.dim() - 1))


def guidance_sample(pipe: Pipeline, reward, prompts: list[str], x_T: Tensor, rho: float = 1.0,
                    model: Callable | None = None, trajectory: bool = False):
    """Gradient guidance through the one-step prediction (FreeDoM, Yu et al. 2023; the paper's Eq. 6):

        g_t     = ∇_{x_t} r(D(x0_hat(x_t)), c)          through the (CFG-guided) model, decoder and reward
        x_{t-1} = step(x_t) + ρ · |step(x_t) − x_t| · g_t / |g_t|   (per sample)

    NOTE: FreeDoM scales ρ_t by the gradient norm; ours scales the unit gradient by the sampler's own step length, so ρ
    is dimensionless (the same ρ works for VP and flow). FreeDoM's time-travel (re-noising) is left out, and DyMO's
    dynamic weighting too: this is the plain guidance row, neither method in full.
    Returns the final latent x_0 (model space), or (x_0, {"x_t": (N+1, B, ...)}).
    """
    model = model or pipe.backbone
    cond, uncond = pipe.conds(prompts)
    x_t, xs = x_T, [x_T]
    for t, t_next in pipe.pairs():
        t_b = pipe.t_batch(t, x_t.shape[0], x_t.device)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            pred = sampler.guided(model, x, t_b, cond, uncond, pipe.guidance)
            g, = torch.autograd.grad(_x0_reward(pipe, reward, prompts, x, t_b, pred).sum(), x)
        x_next, _ = pipe.step(x_t, pred.detach(), t, t_next)
        norm = lambda z: _each(z.flatten(1).norm(dim=1), z)                                  # noqa: E731
        x_t = x_next + rho * norm(x_next - x_t) * g / norm(g).clamp_min(1e-12)
        xs.append(x_t)
    return (x_t, {"x_t": torch.stack(xs)}) if trajectory else x_t


@torch.no_grad()
def epsilon_greedy(pipe: Pipeline, reward, prompts: list[str], x_T: Tensor, n: int = 4, k: int = 20,
                   eps: float = 0.4, lam: float = 0.15, eta: float = 1.0, generator: torch.Generator | None = None,
                   model: Callable | None = None, calls: list | None = None) -> Tensor:
    """ε-greedy search over the noise of every stochastic DDIM step (η = 1), as rvignav/diffusion-tts does it:
    a pivot noise drawn at random; K rounds of N candidates, each fresh N(0, I) with probability ε, else the pivot
    plus a random direction of length u·λ·√D (u ~ U(0, 1), D the latent's size); each candidate's step is scored by
    one more model call at the candidate state (at the same t, as the reference does) -> x̂0 -> decode -> reward; the
    best candidate becomes the pivot; the step is taken with the final pivot. N·K extra model calls per step
    (`calls`, a list, receives one entry per model call, for the test). Defaults: the authors' N 4, K 20, ε 0.4,
    λ 0.15. VP only (the method is defined on DDIM's noise). Returns x_0 (model space)."""
    bb, model = pipe.backbone, model or pipe.backbone
    if bb.kind != "vp":
        raise ValueError("ε-greedy search is defined on DDIM's stochastic step (a VP model)")
    counted = (lambda *a: calls.append(1) or model(*a)) if calls is not None else model
    cond, uncond = pipe.conds(prompts)
    B, D, x = x_T.shape[0], x_T[0].numel(), x_T
    rand = lambda *shape: torch.randn(shape, generator=generator).to(x.device)            # noqa: E731
    for t, t_next in pipe.pairs():
        tb, tn = pipe.t_batch(t, B), pipe.t_batch(t_next, B)
        pred = sampler.guided(counted, x, tb, cond, uncond, pipe.guidance)
        _, _, mean, std = bb.step_logprob(x, pred, tb, tn, eta, x_next=x)             # the step's mean and std
        pivot = rand(*x.shape)
        for _ in range(k):
            best, best_r = pivot, torch.full((B,), -math.inf, device=x.device)
            for _ in range(n):
                fresh = torch.rand(B, generator=generator).to(x.device) < eps                   # per sample
                u = rand(*x.shape)
                u = u / _each(u.flatten(1).norm(dim=1), x)
                radius = torch.rand(B, generator=generator).to(x.device) * lam * math.sqrt(D)
                cand = torch.where(_each(fresh, x), rand(*x.shape), pivot + u * _each(radius, x))
                x_cand = mean + std * cand
                r = _x0_reward(pipe, reward, prompts, x_cand, tb,
                               sampler.guided(counted, x_cand, tb, cond, uncond, pipe.guidance))
                better = r > best_r
                best = torch.where(_each(better, x), cand, best)
                best_r = torch.where(better, r, best_r)
            pivot = best
        x = mean + std * pivot
    return x


def freedom(pipe: Pipeline, reward, prompts: list[str], x_T: Tensor, window: tuple[float, float] = (0.3, 0.7),
            travel: tuple[float, float] = (0.4, 0.7), repeats: int = 3, scale: float = 0.2,
            generator: torch.Generator | None = None, model: Callable | None = None, calls: list | None = None
            ) -> Tensor:
    """FreeDoM (its SD code, ddim.py: p_sample_ddim_conditional), on the pipeline's DDIM schedule. Step index i counts
    down from N − 1 to 0 as in the reference (there N = 100: guidance for 30 <= i < 70, time travel r = 3 for
    40 <= i < 70); here the same fractions of N. At each step, `repeats` times inside the travel window, once
    elsewhere:
        x_prev = c1 x̂0 + c2 x_t + c3 z                      the DDPM posterior sample (η = 1)
        x_prev += ρ ∇_{x_t} r(D(x̂0(x_t)))                   inside the guidance window (the reference lowers an
                                                            energy; ours raises a reward),
                  ρ = scale · cfg · RMS(ε_c − ε_u) / RMS(∇)  (scale 0.2)
        x_t = sqrt(β) x_prev + sqrt(1 − β) z, β = ᾱ_t / ᾱ_prev   time travel: back to t, and again
    `calls` receives one entry per model call (tests count the repeats). VP with CFG only. Returns x_0."""
    bb, model = pipe.backbone, model or pipe.backbone
    if bb.kind != "vp" or pipe.guidance <= 1:
        raise ValueError("FreeDoM as published runs DDIM with classifier-free guidance (a VP model, CFG > 1)")
    counted = (lambda *a: calls.append(1) or model(*a)) if calls is not None else model
    cond, uncond = pipe.conds(prompts)
    pairs, B = pipe.pairs(), x_T.shape[0]
    N, x = len(pairs), x_T
    rand = lambda like: torch.randn(like.shape, generator=generator).to(like.device)    # noqa: E731
    for i, (t, t_prev) in enumerate(pairs):
        index = N - 1 - i
        guide = window[0] * N <= index < window[1] * N
        r = repeats if travel[0] * N <= index < travel[1] * N else 1
        tb = pipe.t_batch(t, B)
        a_t = bb.schedule.alpha_bar_at(t).to(x.device)
        a_prev = bb.schedule.alpha_bar_at(t_prev).to(x.device)
        for _ in range(r):
            with torch.enable_grad():
                xg = x.detach().requires_grad_(guide)
                e_u, e_c = sampler.guidance_split(counted(*sampler.guidance_rows(xg, tb, cond, uncond)))
                e_t = e_u + pipe.guidance * (e_c - e_u)
                x0 = bb.x0_hat(xg, tb, e_t)
                if guide:
                    g, = torch.autograd.grad(_x0_reward(pipe, reward, prompts, xg, tb, e_t).sum(), xg)
            c1 = a_prev.sqrt() * (1 - a_t / a_prev) / (1 - a_t)
            c2 = (a_t / a_prev).sqrt() * (1 - a_prev) / (1 - a_t)
            c3 = ((1 - a_prev) * (1 - a_t / a_prev) / (1 - a_t)).sqrt()
            x_prev = (c1 * x0 + c2 * x + c3 * rand(x)).detach()
            if guide:
                rms = lambda z: _each(z.square().flatten(1).mean(1).sqrt(), z)  # noqa: E731
                rho = scale * pipe.guidance * rms(e_c - e_u).detach() / rms(g).clamp_min(1e-12)
                x_prev = x_prev + rho * g
            beta = a_t / a_prev
            x = beta.sqrt() * x_prev + (1 - beta).sqrt() * rand(x)
        x = x_prev
    return x
