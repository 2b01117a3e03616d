"""LoRA as a *functional* injection: run a frozen model with W + s·B·A in place of chosen weights, without touching it.

The hypernetwork (hyperalign.py) emits low-rank factors (A, B) for every target layer; this file only knows parameter
names and `torch.func.functional_call`. Three ways to run the modulated model:

  lora_call            one set of factors for the whole batch: the weights are merged once, W' = W + s·B·A
                       (the fast path: sampling one prompt, with its CFG copies);
  lora_call_per_sample every sample of the batch has its own factors: `torch.func.vmap` over `functional_call`, the
                       model batch being K copies of the B samples stacked as (K B) (CFG: K = 2, uncond and cond copies
                       of sample b share its LoRA);
  merged_params +      the two steps behind both: merged weights can be kept and reused across sampling steps
  call_merged          (variants I and P reuse them, so I costs one hypernetwork call over the base model);
  substituted          a context manager doing the same substitution as `functional_call`, but held open across
                       forward *and* backward, which gradient checkpointing needs (it re-runs the forward during
                       backward; `functional_call` has already restored the original weights by then).

Shape alphabet: B samples (one LoRA each), K copies of a sample in the model batch, R rank, I in, O out features.
Factors: `{module_name: (A, B)}` with A (R, I), B (O, R), or batched A (B, R, I), B (B, O, R).
Δθ = s·B·A with the usual LoRA scale s = alpha / R (Hu et al. 2021, Eq. 3).
"""
from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

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
    """{'<name>.weight': W + s·B·A} for every target: the weights the modulated model runs with.

    Unbatched factors give (O, I) weights; batched ones (B, O, I), one per sample. The product is formed in the
    weight's dtype so a bf16 model stays bf16.

    NOTE: targets of one weight shape are merged together: one stacked product B·A and one multi-tensor add for the
    group instead of three small kernels per layer (SD1.5: 128 targets, a handful of shapes). Same numbers. On an H100
    the per-layer merge took 8 ms, a third of a U-Net call, because each small kernel's launch costs more than its
    arithmetic. A group is cut into chunks of at most MERGE_CHUNK elements to bound the products' memory (FLUX-dev's
    targets hold 1.4 B parameters).
    """
    groups: dict[tuple, list] = {}
    for name, (A, B) in factors.items():
        W = model.get_submodule(name).weight                       # (O, I)
        groups.setdefault((W.shape, W.dtype, W.device, A.shape), []).append((name, W, A, B))
    params = {}
    for items in groups.values():
        per_chunk = max(1, MERGE_CHUNK // items[0][1].numel() // max(1, items[0][2][..., 0, 0].numel()))
        for i in range(0, len(items), per_chunk):
            names, Ws, As, Bs = zip(*items[i:i + per_chunk])
            dtype = Ws[0].dtype
            delta = torch.stack(Bs).to(dtype) @ torch.stack(As).to(dtype)                # (G, [B,] O, I)
            Ws = [W.expand_as(d) if d.dim() > W.dim() else W for W, d in zip(Ws, delta)]
            merged = torch._foreach_add(Ws, list(delta.unbind(0)), alpha=scale)
            params.update({f"{n}.weight": m for n, m in zip(names, merged)})
    return {f"{name}.weight": params[f"{name}.weight"] for name in factors}          # in the targets' order


def call_merged(model: nn.Module, params: dict[str, Tensor], *args):
    """Run `model(*args)` with merged weights from `merged_params`: one set for the whole batch (`functional_call`),
    or, when they carry a leading sample dimension, per sample (`vmap` over `functional_call`).

    Per sample, row r of the model batch (size N = K·B) uses the weights of sample r mod B; positional tensor
    arguments with N rows are split per sample, anything else (None, shared ids, scalars) goes to every sample.

    NOTE: `tie_weights=False`: the generators have no tied parameters, and looking for ties walks every parameter
    of the model on every call (~0.6 ms per toy U-Net step, 6% of it; it kept toy HyperAlign-I above 1.05x).
    """
    name, W = next(iter(params.items()))
    if W.dim() == model.get_parameter(name).dim():
        return functional_call(model, params, args, strict=False, tie_weights=False)
    b = W.shape[0]
    n = next(a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0)
    if n % b:
        raise ValueError(f"model batch {n} is not a multiple of the {b} LoRA samples")
    batched = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in args]
    grouped = [rearrange(a, "(k b) ... -> b k ...", b=b) if t else a for a, t in zip(args, batched)]

    def one(p: dict[str, Tensor], *a):
        return functional_call(model, p, a, strict=False, tie_weights=False)

    in_dims = (0, *[0 if t else None for t in batched])
    # NOTE: on the CPU, vmap has no batching rule for the fused attention kernel and falls back to a per-sample loop
    # with a warning; the math kernel vmaps natively (the same speed on the toy models, measured: 1.14 s both ways).
    with sdpa_kernel([SDPBackend.MATH]) if W.device.type == "cpu" else nullcontext():
        out = vmap(one, in_dims=in_dims, randomness="different")(params, *grouped)
    return rearrange(out, "b k ... -> (k b) ...")


def lora_call(model: nn.Module, factors: Factors, scale: float, *args):
    """Run `model(*args)` with one set of (unbatched) factors for the whole batch: the merged-weights fast path."""
    return call_merged(model, merged_params(model, factors, scale), *args)


def _n_samples(factors: Factors) -> int:
    A, _ = next(iter(factors.values()))
    assert A.dim() == 3, "per-sample factors are batched: A (B, R, I)"
    return A.shape[0]


def lora_call_per_sample(model: nn.Module, factors: Factors, scale: float, *args):
    """Run `model(*args)` where row r of the model batch (size N = K·B) uses the LoRA of sample r mod B.

    The per-sample weights W + s·B_b·A_b are formed once, then `vmap` runs `functional_call` per sample (see
    `call_merged`); `lora_call_per_sample_loop` is the reference it is tested against.
    """
    _n_samples(factors)
    return call_merged(model, merged_params(model, factors, scale), *args)


def lora_call_per_sample_loop(model: nn.Module, factors: Factors, scale: float, *args):
    """The per-sample reference: one `lora_call` per sample on its K rows. Same contract as `lora_call_per_sample`."""
    b = _n_samples(factors)
    n = next(a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0)
    rows = torch.arange(n).view(n // b, b)                          # (K, B): row index of copy k of sample b
    out = [None] * n
    for i in range(b):
        idx = rows[:, i]
        a_i = [a[idx] if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else a for a in args]
        fac_i = {k: (A[i], B[i]) for k, (A, B) in factors.items()}
        y = lora_call(model, fac_i, scale, *a_i)
        for j, r in enumerate(idx.tolist()):
            out[r] = y[j]
    return torch.stack(out)


def squeeze_single(factors: Factors) -> Factors:
    """Batched factors of one sample -> unbatched (the merged fast path serves all its CFG copies)."""
    A, _ = next(iter(factors.values()))
    return {k: (A[0], B[0]) for k, (A, B) in factors.items()} if A.dim() == 3 and A.shape[0] == 1 else factors


def lora_forward(model: nn.Module, factors: Factors | None, scale: float, *args):
    """Dispatch: no factors -> the base model; unbatched or one-sample factors -> merged; otherwise per sample."""
    if factors is None:
        return model(*args)
    return call_merged(model, merged_params(model, squeeze_single(factors), scale), *args)


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
