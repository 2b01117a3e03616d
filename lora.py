"""LoRA as a *functional* injection: run a frozen model with W + s·B·A in place of chosen weights, without touching it.

The hypernetwork (hyperalign.py) emits low-rank factors (A, B) for every target layer; this file only knows parameter
names, `torch.func.functional_call` and forward hooks. Δθ = s·B·A with the usual LoRA scale s = alpha / R (Hu et al.
2021, Eq. 3). One way to run the modulated model, in two steps:

    weights = prepare(model, factors, scale)     once per LoRA (HyperAlign-I / P keep it for a whole segment)
    y = run(model, weights, *args)               per model call; `with applied(model, weights):` for training

`prepare` picks how, from how many samples the factors are for:
  merged    one LoRA (unbatched factors, or a batch of one): the target weights are merged once, W' = W + s·B·A, and
            the model runs through `functional_call` with them; every row of the model batch (e.g. the two CFG copies)
            shares them. The fast path at batch 1, and the only one the CUDA-graph path (accel.py) can capture.
  Unmerged  B samples, each its own LoRA: the model keeps its own W, and each target adds its samples' low-rank term,
            y = x·Wᵀ + s·(x·A_bᵀ)·B_bᵀ for the rows of sample b (a forward hook). The base matmul is shared by the
            whole batch, and two thin batched matmuls per target (R ≪ I, O) replace B per-sample copies of W, as
            multi-LoRA serving does it. Row r of the model batch (size N = K·B, stacked as (K B)) is sample r mod B.
Both give the same numbers to float rounding (tests/test_lora.py: against a loop over samples, with gradients).

Shape alphabet: B samples (one LoRA each), K copies of a sample in the model batch, R rank, I in, O out features.
Factors: `{module_name: (A, B)}` with A (R, I), B (O, R), or batched A (B, R, I), B (B, O, R).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

# Default targets: every attention projection (paper Fig. 3 shows LoRA on the attention blocks only).
UNET_TARGETS = (r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$",)
# NOTE: FLUX default is the double-stream blocks' attention projections only. The single-stream blocks fuse qkv with the
# MLP input in `linear1` (3072 -> 21504) and attention output with the MLP output in `linear2`; a LoRA there also
# modulates the MLP and merged weights would copy 4.3B parameters per LoRA. Add FLUX_SINGLE_TARGETS to include them.
FLUX_TARGETS = (r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)$",)
FLUX_SINGLE_TARGETS = (r"single_blocks\.\d+\.linear[12]$",)

Factors = dict[str, tuple[Tensor, Tensor]]
MERGE_CHUNK = 2 ** 27  # elements of B·A formed at once by merged_params


@dataclass(frozen=True)
class Target:
    """One LoRA target: an nn.Linear of the frozen model, by its module name (= its checkpoint key prefix)."""
    name: str
    in_features: int
    out_features: int


def find_targets(model: nn.Module, patterns: Sequence[str]) -> list[Target]:
    """All nn.Linear modules whose name matches one of the regex `patterns` (re.search), in module order."""
    compiled = [re.compile(p) for p in patterns]
    targets, hits = [], [0] * len(compiled)
    for name, module in model.named_modules():
        matched = [i for i, p in enumerate(compiled) if p.search(name)]
        if not matched:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name!r} is a {type(module).__name__}, not an nn.Linear")
        for i in matched:
            hits[i] += 1
        targets.append(Target(name, module.in_features, module.out_features))
    unused = [p for p, n in zip(patterns, hits) if n == 0]
    if unused:
        raise ValueError(f"LoRA target pattern(s) {unused} match no nn.Linear of {type(model).__name__}")
    return targets


def merged_params(model: nn.Module, factors: Factors, scale: float) -> dict[str, Tensor]:
    """{'<name>.weight': W + s·B·A} for every target of ONE LoRA (unbatched factors): the weights the modulated model
    runs with. The product is formed in the weight's dtype so a bf16 model stays bf16.

    NOTE: targets of one weight shape are merged together: one stacked product B·A and one multi-tensor add for the
    group instead of three small kernels per layer (SD1.5: 128 targets, a handful of shapes). Same numbers. On an H100
    the per-layer merge took 8 ms, a third of a U-Net call, because each small kernel's launch costs more than its
    arithmetic. A group is cut into chunks of at most MERGE_CHUNK elements to bound the products' memory (FLUX-dev's
    targets hold 1.4 B parameters).
    """
    groups: dict[tuple, list] = {}
    for name, (A, B) in factors.items():
        assert A.dim() == 2, "merged_params merges one LoRA: A (R, I); B samples run unmerged (prepare)"
        W = model.get_submodule(name).weight                       # (O, I)
        groups.setdefault((W.shape, W.dtype, W.device, A.shape), []).append((name, W, A, B))
    params = {}
    for items in groups.values():
        per_chunk = max(1, MERGE_CHUNK // items[0][1].numel())
        for i in range(0, len(items), per_chunk):
            names, Ws, As, Bs = zip(*items[i:i + per_chunk])
            dtype = Ws[0].dtype
            delta = torch.stack(Bs).to(dtype) @ torch.stack(As).to(dtype)                # (G, O, I)
            merged = torch._foreach_add(list(Ws), list(delta.unbind(0)), alpha=scale)
            params.update({f"{n}.weight": m for n, m in zip(names, merged)})
    return {f"{name}.weight": params[f"{name}.weight"] for name in factors}          # in the targets' order


@dataclass(frozen=True)
class Unmerged:
    """B samples' LoRAs, applied unmerged (see the module docstring): batched factors and the scale."""
    factors: Factors
    scale: float

    @property
    def samples(self) -> int:
        return next(iter(self.factors.values()))[0].shape[0]


Weights = dict[str, Tensor] | Unmerged | None      # what prepare returns and run takes (None: the base model)


def prepare(model: nn.Module, factors: Factors, scale: float) -> dict[str, Tensor] | Unmerged:
    """The cheapest way to run `factors`: merged weights for one LoRA (unbatched, or a batch of one), else Unmerged."""
    A, _ = next(iter(factors.values()))
    if A.dim() == 2:
        return merged_params(model, factors, scale)
    if A.shape[0] == 1:
        return merged_params(model, {k: (a[0], b[0]) for k, (a, b) in factors.items()}, scale)
    return Unmerged(factors, scale)


def _add_lora(A: Tensor, B: Tensor, scale: float):
    """A forward hook adding s·(x·A_bᵀ)·B_bᵀ to an nn.Linear's output for the rows of each sample b."""
    def hook(module: nn.Module, inputs: tuple, y: Tensor) -> Tensor:
        x = inputs[0]
        b = A.shape[0]
        if x.shape[0] % b:
            raise ValueError(f"model batch {x.shape[0]} is not a multiple of the {b} LoRA samples")
        xs = x.reshape(x.shape[0] // b, b, -1, x.shape[-1])                         # (K, B, L, I): rows (k b)
        h = torch.einsum("kbli,bri->kblr", xs, A.to(x.dtype))                        # (K, B, L, R)
        return y + scale * torch.einsum("kblr,bor->kblo", h, B.to(x.dtype)).reshape(y.shape)
    return hook


@contextmanager
def applied(model: nn.Module, weights: Weights) -> Iterator[nn.Module]:
    """Inside the block `model(*args)` runs with the LoRA, forward and backward (gradient checkpointing recomputes
    the forward during backward, so the LoRA must still be in place then): merged weights substituted for the
    model's own, or Unmerged's hooks. None: the base model."""
    if weights is None:
        yield model
    elif isinstance(weights, Unmerged):
        handles = [model.get_submodule(name).register_forward_hook(_add_lora(A, B, weights.scale))
                   for name, (A, B) in weights.factors.items()]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()
    else:
        with substituted(model, weights):
            yield model


def run(model: nn.Module, weights: Weights, *args):
    """`model(*args)` with prepared LoRA weights: merged ones through `functional_call`, Unmerged ones through
    `applied`'s hooks, None the base model.

    NOTE: `tie_weights=False`: the generators have no tied parameters, and looking for ties walks every parameter
    of the model on every call (~0.6 ms per toy U-Net step, 6% of it; it kept toy HyperAlign-I above 1.05x)."""
    if weights is None:
        return model(*args)
    if isinstance(weights, Unmerged):
        with applied(model, weights):
            return model(*args)
    return functional_call(model, weights, args, strict=False, tie_weights=False)


@contextmanager
def substituted(model: nn.Module, params: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Hold `params` in place of the model's parameters until the block exits (forward and backward inside it).

    NOTE: the same substitution `functional_call` does, kept open longer: gradient checkpointing recomputes the
    forward during backward, and with `functional_call` that recomputation would see the original weights (torch
    raises a CheckpointError). Training therefore runs forward + backward inside `with substituted(...)`.
    """
    saved = []
    for key, value in params.items():
        module_name, _, pname = key.rpartition(".")
        module = model.get_submodule(module_name)
        if pname not in module._parameters:
            raise ValueError(f"{key}: not a parameter of the model")
        saved.append((module, pname, module._parameters[pname]))
        module._parameters[pname] = value                          # a plain tensor; nn.Module.__getattr__ returns it
    try:
        yield model
    finally:
        for module, pname, old in reversed(saved):
            module._parameters[pname] = old
