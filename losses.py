"""HyperAlign's training objective (paper sec. 4.3): L = L_R + λ L_G.

    L_R = -r(D(x0_hat(x_t)), c)                  the reward of the modulated model's one-step prediction   (Eq. 8)
    L_G = || f_{θ+Δθ}(x_t, t, c) - target ||²     denoising score matching on preferred images                (Eq. 9)

training_step takes one step of it for HyperAlign or for the static LoRA (methods.StaticLoRA), which differ only in
where Δθ comes from. Shape letters as in hyperalign.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distributed
from backbone import Backbone
from hyperalign import lora_step

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


@contextmanager
def modulated(method, x_s: Tensor, t_s: Tensor, cond, net: nn.Module | None = None) -> Iterator[Callable]:
    """The generator with θ + Δθ, Δθ = H(E(x_s, t_s, c)) made from the state x_s its variant reads (lora_step), one
    LoRA per sample (Eq. 7; for the static LoRA the same Δθ for all). Forward *and* backward go inside the block:
    gradient checkpointing recomputes the forward during the backward, with the same LoRA."""
    with method.applied(method.factors(x_s, t_s, cond, net)) as model:
        yield model


def training_step(method, pipe: "Pipeline", reward, prompts: list[str], pref: dict | None, lam: float,
                  gen: torch.Generator, reward_from: float = 0.0, reward_mode: str = "one-step",
                  rows: slice = slice(None), net: nn.Module | None = None) -> dict:
    """One step of L = L_R + λ L_G (paper Eq. 10) for a batch, every sample with its own LoRA; gradients land in the
    trainable part of `method` only (HyperAlign's hypernetwork, or methods.StaticLoRA's factors). Returns scalars.

    1. roll out trajectories without gradient with the current method (variant S / I / P);
    2. L_R: per sample a step k drawn from `reward_from` of the way along, Δθ from the state its variant reads
       (lora_step(k)); one modulated step at x_k gives x0_hat, decoded and scored. reward_mode "one-step" (the
       paper): x_k is the rolled-out state and x0_hat its one-step prediction. "direct-align" (SRPO, seed 002): x_k is
       the rolled-out x_0 noised to t_k with a known eps, and x0_hat is recovered with that eps after one sampler
       step, so early (noisy) steps are scored on a clean-looking image;
    3. L_G: a preferred image noised to a step drawn from the whole schedule, Δθ from the noised state its variant
       reads, denoised by the modulated model.

    Under torchrun `prompts` is the global batch and `rows` this rank's part: all randomness is drawn for the global
    batch and sliced, so the ranks together do what one process does with the whole batch; `pref` is already this
    rank's part. `net`: the trainable module wrapped in DDP (gradients averaged over ranks in the last backward).
    """
    device, bb, variant, steps = pipe.device, pipe.backbone, method.cfg.variant, pipe.steps
    key = method.cfg.key_steps_for(steps)
    G = len(prompts)
    prompts = prompts[rows]
    B, on = len(prompts), torch.arange(len(prompts))
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(G, gen, device)[rows]
    traj = pipe.rollout(method.sampler_model(cond, steps), x_T, cond, uncond)            # 1. no gradient
    ks = torch.randint(first_reward_step(steps, reward_from), steps, (G,), generator=gen)[rows].tolist()
    ts, pairs, states = traj["t"], pipe.pairs(), traj["x_t"]                           # states (N+1, B, ...)
    if reward_mode == "direct-align":                                                   # x_k = q(x_k | x_0, eps_r)
        eps_r = torch.randn((G, *x_T.shape[1:]), generator=gen)[rows].to(device)
        states = torch.stack([bb.noised(states[-1], eps_r, pipe.t_batch(t, B)) for t in ts])
    elif reward_mode != "one-step":
        raise ValueError(f"reward_mode must be 'one-step' or 'direct-align', got {reward_mode!r}")
    with_g = pref is not None and lam != 0
    if with_g:
        x0 = pipe.encode(pref["chosen"].to(device))
        eps = torch.randn((G, *x0.shape[1:]), generator=gen)[rows].to(device)
        kg = torch.randint(0, steps, (G,), generator=gen)[rows].tolist()
        pcond, _ = pipe.conds(pref["prompts"])

    # 2. L_R = -r(D(x0_hat(x_k)), c), Δθ from x_s, s = lora_step(k)                                    (Eq. 8)
    ss = [lora_step(variant, k, key) for k in ks]
    t_k, t_s = pipe.t_each([ts[k] for k in ks]), pipe.t_each([ts[s] for s in ss])
    x0_hat = bb.x0_hat if reward_mode == "one-step" else (
        lambda x, t, pred: torch.cat([bb.recover(pipe.step(x[i:i + 1], pred[i:i + 1], *pairs[k])[0], eps_r[i:i + 1],
                                                 pipe.t_batch(pairs[k][1], 1)) for i, k in enumerate(ks)]))
    decode = lambda x: clamp_straight_through(pipe.decode(x, clamp=False))             # noqa: E731
    with distributed.sync_if(net, not with_g), modulated(method, states[ss, on], t_s, cond, net) as model:
        loss_r, r = reward_loss(model, x0_hat, states[ks, on], t_k, cond, uncond, pipe.guidance, decode, reward,
                                prompts)
        if not torch.isfinite(loss_r):
            raise FloatingPointError(f"reward loss is {loss_r.item()}")
        loss_r.backward()
    log = {"loss_r": loss_r.item(), "loss_g": 0.0, "reward": r.mean().item()}

    # 3. L_G = || f_{θ+Δθ}(x_k, t_k, c) - target ||², x_k = q(x_k | x0, eps), Δθ from x_s                  (Eq. 9)
    if with_g:
        sg = [lora_step(variant, k, key) for k in kg]
        t_k, t_s = pipe.t_each([ts[k] for k in kg]), pipe.t_each([ts[s] for s in sg])
        with distributed.sync_if(net, True), modulated(method, bb.noised(x0, eps, t_s), t_s, pcond, net) as model:
            loss_g = regularisation_loss(model, bb, x0, eps, t_k, pcond)
            if not torch.isfinite(loss_g):
                raise FloatingPointError(f"regularisation loss is {loss_g.item()}")
            (lam * loss_g).backward()
        log["loss_g"] = loss_g.item()
    log["loss"] = log["loss_r"] + lam * log["loss_g"]
    return log
