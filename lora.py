"""LoRA as a *functional* injection: run a frozen model with W + s·B·A in place of chosen weights, without touching it.

The hypernetwork (hyperalign.py) emits low-rank factors (A, B) for every target layer; this file only knows parameter
names, `torch.func.functional_call` and nn.Linear. Δθ = s·B·A with the usual LoRA scale s = alpha / R (Hu et al.
2021, Eq. 3). One way to run the modulated model, in two steps:

    weights = prepare(model, factors, scale)     once per LoRA (HyperAlign-I / P keep it for a whole segment)
    y = run(model, weights, *args)               per model call; `with applied(model, weights):` for training

`prepare` picks how, from how many samples the factors are for:
  one LoRA  (unbatched factors, or a batch of one): the target weights are merged once, W' = W + s·B·A, and the
            model runs through `functional_call` with them; every row of the model batch (e.g. the two CFG copies)
            shares them. The fast path at batch 1, and the one the CUDA-graph path (accel.py) captures.
  PerSample B samples, each its own LoRA. The model batch holds K copies of each sample, a sample's copies adjacent
            (N = B·K rows, (B K): row r is sample r // K; sampler.guided batches classifier-free guidance so), and
            each target's forward runs it as B matrix products, sample b's K·L rows times its own weights:
            unmerged, y = x·Wᵀ + s·(x·A_bᵀ)·B_bᵀ: the base matmul shared, two thin products (R ≪ I, O), no
            per-sample copy of W, as multi-LoRA serving does it; or, when B copies of the target weights are small
            (PER_SAMPLE_MERGE: the toy models), merged per sample, y = x·(W + s·B_b·A_b)ᵀ.
All of them give the same numbers to float rounding (tests/test_lora.py: against a loop over samples, with
gradients).

Shape alphabet: B samples (one LoRA each), K copies of a sample in the model batch, R rank, I in, O out features.
Factors: `{module_name: (A, B)}` with A (R, I), B (O, R), or batched A (B, R, I), B (B, O, R).
"""
from __future__ import annotations

import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
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


_MODULES: "weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]]" = weakref.WeakKeyDictionary()


def submodule(model: nn.Module, name: str) -> nn.Module:
    """model.get_submodule(name), looked up once per model and name.
    NOTE: get_submodule walks the dotted path attribute by attribute (~5 us); a LoRA on toy SD names 56 targets, and
    HyperAlign-S prepares one every step: the walks were two thirds of `prepare` at batch 1."""
    table = _MODULES.setdefault(model, {})
    if name not in table:
        table[name] = model.get_submodule(name)
    return table[name]


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
        W = submodule(model, name).weight                            # (O, I)
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
class PerSample:
    """B samples' LoRAs, ready to run: per target the operands of its batched products, in the weight's dtype:
    the merged weights transposed, (W + s·B_b·A_b)ᵀ (B, I, O), or, unmerged, the thin factors transposed, A_bᵀ
    (B, I, R) and B_bᵀ (B, R, O) (prepare chooses)."""
    samples: int
    scale: float
    operands: dict[str, tuple[Tensor, ...]]

    @property
    def merged(self) -> bool:
        return len(next(iter(self.operands.values()))) == 1


Weights = dict[str, Tensor] | PerSample | None      # what prepare returns and run takes (None: the base model)
# NOTE: per-sample weights merged while all of them hold at most this many numbers (the toy models: a few million).
# There a batched matmul with B weight copies costs what the base matmul costs, while the two thin products of the
# unmerged form do not pay for themselves (R is not << I, O at width 32-64, and each product is one more kernel per
# target: measured 1.36-1.56x the base model at batch 4-16 against ~1.1x merged). Real models (SD1.5 at batch 4:
# ~10^9 numbers) run unmerged: no per-sample copy of any weight.
PER_SAMPLE_MERGE = 2 ** 23
_TRANSPOSED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def transposed(model: nn.Module, weights: dict[str, Tensor]) -> Tensor:
    """`weights` (the model's, by target name; one shape) as contiguous Wᵀ, stacked: (G, I, O); kept per model until
    one of them is changed or replaced."""
    table, names = _TRANSPOSED.setdefault(model, {}), tuple(weights)
    kept = table.get(names)
    if kept is None or any(W is not w or W._version != v for W, (w, v) in zip(weights.values(), kept[0])):
        kept = table[names] = ([(W, W._version) for W in weights.values()],
                               torch.stack([W.detach().t() for W in weights.values()]))
    return kept[1]


def prepare(model: nn.Module, factors: Factors, scale: float) -> dict[str, Tensor] | PerSample:
    """The cheapest way to run `factors`: merged weights for one LoRA (unbatched, or a batch of one); for B samples a
    PerSample, merged per sample when the B copies of the target weights are small (PER_SAMPLE_MERGE), else
    unmerged.
    NOTE: merged per-sample weights are formed in the layout the products read, (B, I, O), from a contiguous Wᵀ (from
    the view W.t(), baddbmm took 2.3-2.8x as long), kept between LoRAs (`transposed`), for all targets of one shape
    at once, as merged_params does for one LoRA. HyperAlign-S prepares a LoRA every step: copying Wᵀ and one product
    per target made prepare cost 1.02 ms, the kept Wᵀ 0.85 ms, and one product per shape 0.51 ms (toy SD, batch 4).
    """
    A, _ = next(iter(factors.values()))
    if A.dim() == 2:
        return merged_params(model, factors, scale)
    if A.shape[0] == 1:
        return merged_params(model, {k: (a[0], b[0]) for k, (a, b) in factors.items()}, scale)
    b, Ws = A.shape[0], {n: submodule(model, n).weight for n in factors}
    if b * sum(W.numel() for W in Ws.values()) > PER_SAMPLE_MERGE:                    # (B, I, R), (B, R, O)
        return PerSample(b, scale, {n: (A.transpose(1, 2).to(Ws[n].dtype), B.transpose(1, 2).to(Ws[n].dtype))
                                    for n, (A, B) in factors.items()})
    groups: dict[tuple, list[str]] = {}
    for n, W in Ws.items():
        groups.setdefault((W.shape, W.dtype, W.device, factors[n][0].shape), []).append(n)
    merged = {}
    for names in map(tuple, groups.values()):
        Wt = transposed(model, {n: Ws[n] for n in names})                               # (G, I, O)
        W = Wt[:, None].expand(-1, b, -1, -1).reshape(-1, *Wt.shape[1:])                # (G B, I, O), a copy
        At, Bt = (torch.stack([factors[n][i] for n in names]).to(Wt.dtype).transpose(2, 3).flatten(0, 1)
                  for i in (0, 1))                                                       # (G B, I, R), (G B, R, O)
        merged.update(zip(names, W.baddbmm_(At, Bt, alpha=scale).unflatten(0, (len(names), b)).unbind(0)))
    return PerSample(b, scale, {n: (merged[n],) for n in factors})                      # each (B, I, O)


def _per_sample_linear(module: nn.Linear, weights: tuple[Tensor, ...], b: int, scale: float):
    """The forward of a target with each sample's LoRA on its rows: x (N = B·K, ..., I) -> (N, ..., O), as B matrix
    products over a view of x, (B, K·L, I), sample b's K copies together (no activation or weight is copied per copy):
    merged, x·(W + s·B_b·A_b)ᵀ + bias; unmerged, x·Wᵀ + bias + s·(x·A_bᵀ)·B_bᵀ."""
    # NOTE: this runs for every target at every model call; each tensor op saved here counts (setting it straight into
    # the module's __dict__ and broadcasting the bias took the LoRA model call from 1.08-1.09x to 1.05x the base
    # model's: toy SD, batch 4). With a sample's copies adjacent, one product covers all its rows. With the copies
    # stacked (K B), as diffusers batches CFG, the weights had to be copied K times or run as K products: HyperAlign
    # at batch 4 took 1.10 / 1.22 / 1.75x the base model (I / P / S), against 1.06 / 1.17 / 1.67x with the copies
    # adjacent (toy SD, one interleaved run, the layout alone).
    def forward(x: Tensor) -> Tensor:
        if x.shape[0] % b:
            raise ValueError(f"model batch {x.shape[0]} is not a multiple of the {b} LoRA samples")
        ops = weights if weights[0].dtype == x.dtype else tuple(m.to(x.dtype) for m in weights)
        x3 = x.reshape(b, -1, x.shape[-1])                                              # (B, K L, I)
        if len(ops) == 2:
            y = torch.baddbmm(F.linear(x3, module.weight, module.bias), torch.bmm(x3, ops[0]), ops[1], alpha=scale)
        elif module.bias is None:
            y = torch.bmm(x3, ops[0])
        else:
            y = torch.baddbmm(module.bias.to(x.dtype), x3, ops[0])                      # the bias broadcast
        return y.view(*x.shape[:-1], y.shape[-1])
    return forward


@contextmanager
def applied(model: nn.Module, weights: Weights) -> Iterator[nn.Module]:
    """Inside the block `model(*args)` runs with the LoRA, forward and backward (gradient checkpointing recomputes
    the forward during backward, so the LoRA must still be in place then): merged weights substituted for the
    model's own, or, for per-sample LoRAs, each target's forward replaced by the per-sample one (an instance
    attribute, removed on exit: the module's own forward is untouched). None: the base model."""
    if weights is None:
        yield model
    elif isinstance(weights, PerSample):
        mods = [(submodule(model, name), ops) for name, ops in weights.operands.items()]
        for m, ops in mods:                                             # NOTE: not through nn.Module.__setattr__
            m.__dict__["forward"] = _per_sample_linear(m, ops, weights.samples, weights.scale)
        try:
            yield model
        finally:
            for m, _ in mods:
                del m.__dict__["forward"]
    else:
        with substituted(model, weights):
            yield model


def run(model: nn.Module, weights: Weights, *args):
    """`model(*args)` with prepared LoRA weights: one LoRA's merged weights through `functional_call`, per-sample
    LoRAs through `applied`, None the base model.

    NOTE: `tie_weights=False`: the generators have no tied parameters, and looking for ties walks every parameter
    of the model on every call (~0.6 ms per toy U-Net step, 6% of it; it kept toy HyperAlign-I above 1.05x)."""
    if weights is None:
        return model(*args)
    if isinstance(weights, PerSample):
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
        module = submodule(model, module_name)
        if pname not in module._parameters:
            raise ValueError(f"{key}: not a parameter of the model")
        saved.append((module, pname, module._parameters[pname]))
        module._parameters[pname] = value                          # a plain tensor; nn.Module.__getattr__ returns it
    try:
        yield model
    finally:
        for module, pname, old in reversed(saved):
            module._parameters[pname] = old
