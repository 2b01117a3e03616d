"""HyperAlign's training objective (paper sec. 4.3): L = L_R + λ L_G.

    L_R = -r(D(x0_hat(x_t)), c)                  the reward of the modulated model's one-step prediction   (Eq. 8)
    L_G = || f_{θ+Δθ}(x_t, t, c) - target ||²     denoising score matching on preferred images                (Eq. 9)

training_step takes one step of it for HyperAlign or for the static LoRA (methods.StaticLoRA), which differ only in
where Δθ comes from. Shape letters as in hyperalign.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distributed
from backbone import Backbone
from hyperalign import cond_rows, lora_step

if TYPE_CHECKING:
    from pipeline import Pipeline


def reward_loss(model: Callable, x0_hat: Callable, x_t: Tensor, t: Tensor, cond, uncond, guidance: float,
                decode: Callable[[Tensor], Tensor], reward: Callable, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """L_R = -r(D(x0_hat(x_t)), c) for the modulated model's one-step prediction (paper Eq. 8).

    x_t comes from a rollout without gradient; the gradient flows through this one model step (and the decoder)
    into Δθ. With `uncond` the prediction is classifier-free guided (as in sampling), the two copies sharing the
    sample's LoRA. Returns (loss, reward per sample).
    """
    if uncond is not None:
        u, c = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        pred = u + guidance * (c - u)
    else:
        pred = model(x_t, t, cond)
    r = reward(decode(x0_hat(x_t, t, pred)), prompts)                # (B,)
    return -r.mean(), r.detach()


def clamp_straight_through(images: Tensor) -> Tensor:
    """Images clamped to [0, 1] in value, the identity in gradient.
    NOTE: a hard clamp in L_R's decode removed the reward gradient from every pixel outside [0, 1]; on the toy world
    that is 44-48% of decoded pixel-channels (mostly the black background below 0), so L_R could not draw or move an
    object over the background. Unclamped images would let the reward be hacked with values no sample ever shows;
    this way the reward scores what sampling outputs, and the gradient reaches every pixel."""
    return images + (images.clamp(0, 1) - images).detach()


def regularisation_loss(model: Callable, backbone: Backbone, x0: Tensor, eps: Tensor, t: Tensor, cond) -> Tensor:
    """L_G (paper Eq. 9): the modulated model's denoising loss on preferred images x0, || f(x_t, t, c) - target ||^2
    with x_t ~ q(x_t | x0, eps): the eps target for VP (or v), the velocity eps - x0 for flow."""
    pred = model(backbone.noised(x0, eps, t), t, cond)
    return F.mse_loss(pred.float(), backbone.target(x0, eps, t).float())


def first_reward_step(steps: int, reward_from: float) -> int:
    """The first sampling step (0 = the noisiest) at which L_R may be taken: `reward_from` of the way along."""
    return min(int(reward_from * steps), steps - 1)


def training_step(method, pipe: "Pipeline", reward, prompts: list[str], pref: dict | None, lam: float,
                  gen: torch.Generator, reward_from: float = 0.0, reward_mode: str = "one-step",
                  rows: slice = slice(None), net: nn.Module | None = None) -> dict:
    """One step of L = L_R + λ L_G (paper Eq. 10) over a batch, accumulated sample by sample; gradients land in the
    trainable part of `method` only (HyperAlign's hypernetwork, or methods.StaticLoRA's factors). Returns scalars.

    1. roll out trajectories without gradient with the current method (variant S / I / P);
    2. per sample, a step k drawn from `reward_from` of the way along; Δθ from the state its variant would use
       (lora_step); one modulated step at x_k gives x0_hat, decoded and scored: L_R. reward_mode "one-step" (the
       paper): x_k is the rolled-out state and x0_hat its one-step prediction. "direct-align" (SRPO, seed 002): x_k is
       the rolled-out x_0 noised to t_k with a known eps, and x0_hat is recovered with that eps after one sampler
       step, so early (noisy) steps are scored on a clean-looking image;
    3. a preferred image noised to a step drawn from the whole schedule, Δθ from the noised state its variant would
       use, denoised by the modulated model: L_G.

    Under torchrun `prompts` is the global batch and `rows` this rank's part: all randomness is drawn for the global
    batch and sliced, so the ranks together do what one process does with the whole batch; `pref` is already this
    rank's part. `net`: the trainable module wrapped in DDP (gradients averaged over ranks in the last backward).
    """
    device, bb, variant, steps = pipe.device, pipe.backbone, method.cfg.variant, pipe.steps
    key = method.cfg.key_steps_for(steps)
    G = len(prompts)
    prompts = prompts[rows]
    B = len(prompts)
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(G, gen, device)[rows]
    traj = pipe.rollout(method.sampler_model(cond, steps), x_T, cond, uncond)            # 1. no gradient
    ks = torch.randint(first_reward_step(steps, reward_from), steps, (G,), generator=gen)[rows].tolist()
    ts, pairs = traj["t"], pipe.pairs()
    states = traj["x_t"]                                                                # (N+1, B, ...)
    if reward_mode == "direct-align":                                                   # x_k = q(x_k | x_0, eps_r)
        eps_r = torch.randn((G, *x_T.shape[1:]), generator=gen)[rows].to(device)
        x_0 = states[-1]
        states = torch.stack([bb.noised(x_0, eps_r, pipe.t_batch(t, B)) for t in ts])
    elif reward_mode != "one-step":
        raise ValueError(f"reward_mode must be 'one-step' or 'direct-align', got {reward_mode!r}")
    if pref is not None:
        x0 = pipe.encode(pref["chosen"].to(device))
        eps = torch.randn((G, *x0.shape[1:]), generator=gen)[rows].to(device)
        kg = torch.randint(0, steps, (G,), generator=gen)[rows].tolist()
        pcond, _ = pipe.conds(pref["prompts"])
    decode = lambda x: clamp_straight_through(pipe.decode(x, clamp=False))             # noqa: E731
    log = {"loss_r": 0.0, "loss_g": 0.0, "reward": 0.0}
    with_g = pref is not None and lam != 0
    for i in range(B):
        row = slice(i, i + 1)
        c_i, u_i = cond_rows(cond, row), None if uncond is None else uncond[row]
        k, s = ks[i], lora_step(variant, ks[i], key)
        t_k, t_s = pipe.t_batch(ts[k], 1), pipe.t_batch(ts[s], 1)
        with distributed.sync_if(net, i == B - 1 and not with_g):                       # DDP: sync in the last backward
            factors = method.factors(states[s][row], t_s, c_i, net)                     # 2. with gradient
            x0_hat = bb.x0_hat if reward_mode == "one-step" else \
                (lambda x, t, pred, k=k, i=i: bb.recover(pipe.step(x, pred, *pairs[k])[0], eps_r[i:i + 1],
                                                          pipe.t_batch(pairs[k][1], 1)))
            with method.applied(factors) as model:
                loss_r, r = reward_loss(model, x0_hat, states[k][row], t_k, c_i, u_i, pipe.guidance,
                                        decode, reward, prompts[row])
                if not torch.isfinite(loss_r):
                    raise FloatingPointError(f"reward loss is {loss_r.item()}")
                (loss_r / B).backward()
        log["loss_r"] += loss_r.item() / B
        log["reward"] += r.mean().item() / B
        if not with_g:
            continue
        k, s = kg[i], lora_step(variant, kg[i], key)                                     # 3.
        t_k, t_s = pipe.t_batch(ts[k], 1), pipe.t_batch(ts[s], 1)
        pc_i = cond_rows(pcond, row)
        with distributed.sync_if(net, i == B - 1):
            factors = method.factors(bb.noised(x0[row], eps[row], t_s), t_s, pc_i, net)
            with method.applied(factors) as model:
                loss_g = regularisation_loss(model, bb, x0[row], eps[row], t_k, pc_i)
                if not torch.isfinite(loss_g):
                    raise FloatingPointError(f"regularisation loss is {loss_g.item()}")
                (lam * loss_g / B).backward()
        log["loss_g"] += loss_g.item() / B
    log["loss"] = log["loss_r"] + lam * log["loss_g"]
    return log
