"""HyperAlign's training objective (paper sec. 4.3): L = L_R + λ L_G.

    L_R = -r(D(x0_hat(x_t)), c)                  the reward of the modulated model's one-step prediction   (Eq. 8)
    L_G = || f_{θ+Δθ}(x_t, t, c) - target ||²     denoising score matching on preferred images                (Eq. 9)

training_step takes one step of it for HyperAlign or for the static LoRA (methods.StaticLoRA), which differ only in
where Δθ comes from. Shape letters as in hyperalign.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import distributed
import sampler
from backbone import Backbone

if TYPE_CHECKING:
    from pipeline import Pipeline


def reward_loss(model: Callable, x0_hat: Callable, x_t: Tensor, t: Tensor, cond, uncond, guidance: float,
                decode: Callable[[Tensor], Tensor], reward: Callable, prompts: list[str]) -> tuple[Tensor, Tensor]:
    """L_R = -r(D(x0_hat(x_t)), c) for the modulated model's one-step prediction (paper Eq. 8).

    x_t comes from a rollout without gradient; the gradient flows through this one model step (and the decoder)
    into Δθ. With `uncond` the prediction is classifier-free guided as in sampling (sampler.guided), the two copies
    sharing the sample's LoRA. Returns (loss, reward per sample).
    """
    pred = sampler.guided(model, x_t, t, cond, uncond, guidance)
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


@dataclass
class Draw:
    """One training step's inputs after the rollout, each random choice already made. Where L_R's model step is
    taken (x_k, t_k) and the state Δθ is made from (x_s, t_s: s = HyperConfig.lora_step_for(k)); L_G's likewise, on
    preferred images."""
    prompts: list[str]
    cond: Tensor
    uncond: Tensor | None
    reward_at: tuple[Tensor, Tensor]                   # (x_k, t_k): L_R's one modulated step
    reward_lora: tuple[Tensor, Tensor, Tensor]          # (x_s, t_s, cond): Δθ's input for L_R
    x0_hat: Callable                                    # (x_k, t_k, prediction) -> x0_hat
    pref: tuple | None = None                           # (x0, eps, t_k, pcond): L_G's denoising problem
    pref_lora: tuple | None = None                      # (x_s, t_s, pcond): Δθ's input for L_G


def draw(method, pipe: "Pipeline", prompts: list[str], pref: dict | None, gen: torch.Generator, reward_from: float,
         reward_mode: str, rows: slice) -> Draw:
    """1. Roll out the batch with the current method (no gradient), then draw L_R's step k per sample (from
    `reward_from` of the way along; direct-align: and the noise x_0 is re-noised with) and L_G's noise and step.
    Every random draw is made for the global batch and sliced to this rank's `rows` (see training_step)."""
    device, bb, steps = pipe.device, pipe.backbone, pipe.steps
    which = lambda ks: [method.cfg.lora_step_for(k, steps) for k in ks]                           # noqa: E731
    G, prompts = len(prompts), prompts[rows]
    B, on = len(prompts), torch.arange(len(prompts))
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(G, gen, device)[rows]
    traj = pipe.rollout(method.sampler_model(cond, steps), x_T, cond, uncond)
    ts, states = traj["t"], traj["x_t"]                                                 # states (N+1, B, ...)
    ks = torch.randint(first_reward_step(steps, reward_from), steps, (G,), generator=gen)[rows].tolist()
    x0_hat = bb.x0_hat
    if reward_mode == "direct-align":                                                   # x_k = q(x_k | x_0, eps_r)
        eps_r = torch.randn((G, *x_T.shape[1:]), generator=gen)[rows].to(device)
        states = torch.stack([bb.noised(states[-1], eps_r, pipe.t_batch(t, B)) for t in ts])
        x0_hat = direct_align_x0_hat(pipe, ks, eps_r)
    elif reward_mode != "one-step":
        raise ValueError(f"reward_mode must be 'one-step' or 'direct-align', got {reward_mode!r}")
    ss = which(ks)
    d = Draw(prompts, cond, uncond, (states[ks, on], pipe.t_each([ts[k] for k in ks])),
             (states[ss, on], pipe.t_each([ts[s] for s in ss]), cond), x0_hat)
    if pref is not None:
        x0 = pipe.encode(pref["chosen"].to(device))
        eps = torch.randn((G, *x0.shape[1:]), generator=gen)[rows].to(device)
        kg = torch.randint(0, steps, (G,), generator=gen)[rows].tolist()
        sg = which(kg)
        pcond, t_s = pipe.conds(pref["prompts"])[0], pipe.t_each([ts[s] for s in sg])
        d.pref = (x0, eps, pipe.t_each([ts[k] for k in kg]), pcond)
        d.pref_lora = (bb.noised(x0, eps, t_s), t_s, pcond)
    return d


def direct_align_x0_hat(pipe: "Pipeline", ks: list[int], eps_r: Tensor) -> Callable:
    """Direct-Align's x0_hat (SRPO, seed 002): one sampler step from x_k (k per sample), then x_0 recovered from it
    with the known noise eps_r, so that an early, noisy step is scored on a clean-looking image."""
    pairs = pipe.pairs()

    def x0_hat(x: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        return torch.cat([pipe.backbone.recover(pipe.step(x[i:i + 1], pred[i:i + 1], *pairs[k])[0], eps_r[i:i + 1],
                                                pipe.t_batch(pairs[k][1], 1)) for i, k in enumerate(ks)])
    return x0_hat


def backward(method, lora_from: tuple, loss: Callable, net: nn.Module | None, last: bool, scale: float = 1.0,
             name: str = "loss") -> tuple[float, object]:
    """Δθ = H(E(x_s, t_s, c)) from `lora_from` (one LoRA per sample, Eq. 7; the static LoRA's for all), `loss(model)`
    -> (loss, extra) with the modulated generator, and scale * loss backpropagated. Forward *and* backward happen
    inside the LoRA's block: gradient checkpointing recomputes the forward during the backward, with the same LoRA.
    `last`: the step's last backward, where DDP averages the gradients over ranks."""
    with distributed.sync_if(net, last), method.applied(method.factors(*lora_from, net)) as model:
        value, extra = loss(model)
        if not torch.isfinite(value):
            raise FloatingPointError(f"{name} is {value.item()}")
        (scale * value).backward()
    return value.item(), extra


def training_step(method, pipe: "Pipeline", reward, prompts: list[str], pref: dict | None, lam: float,
                  gen: torch.Generator, reward_from: float = 0.0, reward_mode: str = "one-step",
                  rows: slice = slice(None), net: nn.Module | None = None) -> dict:
    """One step of L = L_R + λ L_G (paper Eq. 10) for a batch, every sample with its own LoRA; gradients land in the
    trainable part of `method` only (HyperAlign's hypernetwork, or methods.StaticLoRA's factors). Returns scalars.

    1. roll out trajectories without gradient with the current method (variant S / I / P) and draw the step's
       randomness (draw);
    2. L_R (Eq. 8): per sample a step k drawn from `reward_from` of the way along, Δθ from the state its variant
       reads (HyperConfig.lora_step_for(k)); one modulated step at x_k gives x0_hat, decoded and scored.
       reward_mode "one-step" (the paper): x_k is the rolled-out state and x0_hat its one-step prediction;
       "direct-align": direct_align_x0_hat;
    3. L_G (Eq. 9): a preferred image noised to a step drawn from the whole schedule, Δθ from the noised state its
       variant reads, denoised by the modulated model.

    Under torchrun `prompts` is the global batch and `rows` this rank's part: all randomness is drawn for the global
    batch and sliced, so the ranks together do what one process does with the whole batch; `pref` is already this
    rank's part. `net`: the trainable module wrapped in DDP (gradients averaged over ranks in the last backward).
    """
    d = draw(method, pipe, prompts, pref if lam != 0 else None, gen, reward_from, reward_mode, rows)    # 1.
    decode = lambda x: clamp_straight_through(pipe.decode(x, clamp=False))              # noqa: E731
    loss_r, r = backward(method, d.reward_lora, lambda model: reward_loss(                          # 2. L_R
        model, d.x0_hat, *d.reward_at, d.cond, d.uncond, pipe.guidance, decode, reward, d.prompts),
        net, last=d.pref is None, name="reward loss")
    loss_g = 0.0
    if d.pref is not None:                                                                          # 3. L_G
        x0, eps, t_k, pcond = d.pref
        loss_g, _ = backward(method, d.pref_lora, lambda model: (
            regularisation_loss(model, pipe.backbone, x0, eps, t_k, pcond), None), net, last=True, scale=lam,
            name="regularisation loss")
    return {"loss_r": loss_r, "loss_g": loss_g, "reward": r.mean().item(), "loss": loss_r + lam * loss_g}
