"""The methods HyperAlign is compared with, on the same frozen pipeline, reward and loss pieces.

  static LoRA   ONE fixed set of LoRA factors for every input, trained with exactly HyperAlign's loss and training
                step (losses.training_step): the paper's main contrast, fixed weights vs weights generated from
                (x_t, t, c). With the one-step reward it is a DRaFT-1-style fine-tune (gradient through the last model
                call only), not AlignProp (which backpropagates through the whole sampling chain).
                With --reward-mode direct-align and SRPO's relative reward it is the Direct-Align / SRPO baseline.
  Oracle        one static LoRA per prompt group, each sample's picked by reading its prompt: what adapting to
                the prompt by group can add at most (docs/results.md §6).
  METHODS       the trained methods (HyperAlign, the static LoRA) by the kind a run folder records; `builder`
                makes runs.train's argument from a kind.
The test-time methods (Best-of-N, gradient guidance, ε-greedy search, FreeDoM) are in testtime.py, the paper's other
fine-tuning baselines (Diffusion-DPO, Diffusion-KTO, GRPO) in finetune.py.

Shape alphabet: B samples, N candidates (Best-of-N), R rank, I / O in / out features; latents x in the pipeline's
model space ((B, C, H, W) for VP, packed tokens (B, L, C) for flow).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

import config
import lora
from backbone import Backbone
from hyperalign import HyperAlign, HyperConfig, frozen_targets


# ------------------------------------------------------------------------------------------------------- static LoRA

class StaticLoRA(nn.Module):
    """One set of LoRA factors {target: (A (R, I), B (O, R))} for every input: Δθ = s·B·A, B = 0 at init (Δθ = 0).

    It offers HyperAlign's interface (`cfg`, `factors`, `applied`, `sampler_model`), so losses.training_step
    trains it unchanged: the two methods differ only in where Δθ comes from. Its cfg.variant is "I": one LoRA for
    the whole trajectory, the variant whose structure it shares.
    """
    kind = "static"                                       # what a run folder records (runs.py)

    def __init__(self, cfg: HyperConfig, backbone: Backbone):
        super().__init__()
        self.cfg, self.backbone = HyperConfig(**{**cfg.to_dict(), "variant": "I", "key_steps": ()}), backbone
        targets = frozen_targets(self.cfg, backbone)
        self.names = [t.name for t in targets]
        R = cfg.rank
        # NOTE: A is random and B zero (the usual LoRA init, Hu et al. 2021), so the model starts as the base model,
        # as HyperAlign's does.
        self.A = nn.ParameterList([nn.Parameter(torch.randn(R, t.in_features) / math.sqrt(t.in_features))
                                   for t in targets])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(t.out_features, R)) for t in targets])

    @property
    def trainable(self) -> nn.Module:
        """The part training optimises and a run folder saves: all of it."""
        return self

    def forward(self) -> lora.Factors:
        return {n: (A, B) for n, A, B in zip(self.names, self.A, self.B)}

    def factors(self, x_t: Tensor | None = None, t: Tensor | None = None, cond=None,
                net: nn.Module | None = None) -> lora.Factors:
        """The same factors whatever the input (`net`: this module wrapped for DDP)."""
        return (net or self)()

    @contextmanager
    def applied(self, factors: lora.Factors) -> Iterator[Callable]:
        with lora.applied(self.backbone.model, lora.prepare(self.backbone.model, factors, self.cfg.scale)):
            yield self.backbone

    def sampler_model(self, cond=None, steps: int | None = None, fast=None) -> Callable:
        """The model callable for the samplers: weights merged once (a static LoRA costs nothing per step); with
        `fast` (accel.Fast) merged into its static weights."""
        if fast is not None:
            fast.weights.reset()                          # merge onto θ, not onto a LoRA the buffers still hold
        with torch.no_grad():
            params = lora.prepare(self.backbone.model, self(), self.cfg.scale)
        if fast is not None:
            fast.weights.load(params)
            return fast
        return lambda x_t, t, c: self.backbone.forward(params, x_t, t, c)


METHODS = {"hyperalign": HyperAlign, "static": StaticLoRA}   # the trained methods, by the kind a run folder records


def builder(kind: str, cfg) -> Callable[[Backbone], nn.Module]:
    """runs.train's `build` for a run of `kind` with the architecture of RunConfig `cfg` (config.hyper_config):
    built on the backbone once the run has loaded it. train.py and baselines.py spell theirs out."""
    return lambda backbone: METHODS[kind](config.hyper_config(cfg), backbone)


class Oracle:
    """One static LoRA per prompt group, each sample's picked by an oracle that reads its prompt (world.group): the
    most that adapting to the prompt *by group* can add over one shared LoRA. Each group's LoRA is a StaticLoRA
    trained on that group's prompts; a batch of mixed groups runs every sample with its own (lora.prepare)."""

    def __init__(self, loras: dict, group: Callable[[str], str], backbone: Backbone):
        self.loras, self.group, self.backbone = loras, group, backbone
        self.cfg = next(iter(loras.values())).cfg

    def sampler_model(self, cond, steps: int | None = None, prompts: list[str] | None = None) -> Callable:
        if prompts is None:
            raise ValueError("the oracle reads the prompts: sampler_model(cond, steps, prompts)")
        with torch.no_grad():
            each = [self.loras[self.group(p)]() for p in prompts]
            factors = {n: (torch.stack([f[n][0] for f in each]), torch.stack([f[n][1] for f in each]))
                       for n in each[0]}
            weights = lora.prepare(self.backbone.model, factors, self.cfg.scale)
        return lambda x_t, t, c: self.backbone.forward(weights, x_t, t, c)
