"""A fast sampling path for GPUs, shared by the base model and every HyperAlign variant (sample.py --fast).

On a GPU one SD1.5 U-Net call of a 512 px sample is bound by kernel launches (an H100: ~23 ms for two CFG rows), so
what costs is every extra small kernel and every wait of the host for the GPU. Here:

  * the LoRA targets' weights live in static buffers, and a new LoRA is merged into them in place (one grouped merge,
    one multi-tensor copy), so the model call itself never changes: for the base model it is the same call;
  * that one call is captured once as a CUDA graph (mode "graph") and replayed every step, or compiled ("compile");
    "eager" runs the same buffers without either (the CPU path, and the reference the tests compare against);
  * channels_last for the U-Net's convolutions (CUDA), no host sync anywhere: the step index is counted, never read
    from t (hyperalign.Modulated), and the perception encoder sees the conditional rows only.

The buffers hold one set of weights, so the fast path samples one image at a time (with its CFG copies); a batch of
several samples, each with its own LoRA, takes lora.py's unmerged path.
Shape alphabet: B samples, O / I out / in features.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

import lora

MODES = ("eager", "graph", "compile")


class StaticWeights:
    """The target weights of a frozen model used as static buffers: `load` copies θ + Δθ into them in place, `reset`
    puts θ back. The model object runs unchanged (no functional_call), so its call can be captured.
    NOTE: while a LoRA is loaded, the model's own weights are θ + Δθ: everything that reads them (a merge, the
    perception encoder) must `reset` first, as Modulated and StaticLoRA do."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        self.model, self.names = model, list(names)
        self.base = {n: model.get_submodule(n).weight.detach().clone() for n in self.names}
        self.buffers = [model.get_submodule(n).weight for n in self.names]
        for n, buf in zip(self.names, self.buffers):
            buf.requires_grad_(False)

    @torch.no_grad()
    def load(self, params: dict[str, Tensor] | None) -> None:
        """Copy θ + Δθ (lora.prepare's merged weights of one sample, (O, I) each) into the buffers; None: the base."""
        src = [self.base[n] for n in self.names] if params is None else [params[f"{n}.weight"] for n in self.names]
        torch._foreach_copy_(self.buffers, src)

    reset = lambda self: self.load(None)  # noqa: E731


class Fast:
    """One model call `backbone(x_t, t, cond)` of fixed shapes, run eagerly, from a CUDA graph, or compiled."""

    def __init__(self, backbone, targets: list[str], mode: str = "graph", channels_last: bool = True):
        if mode not in MODES:
            raise ValueError(f"fast mode must be one of {MODES}, got {mode!r}")
        if mode != "eager" and backbone.device.type != "cuda":
            raise ValueError(f"--fast {mode} needs a CUDA device; on {backbone.device.type} use the default path")
        self.backbone, self.mode = backbone, mode
        self.weights = StaticWeights(backbone.model, targets)
        if channels_last and backbone.kind == "vp" and backbone.device.type == "cuda":
            backbone.model.to(memory_format=torch.channels_last)
        self.fn: Callable = torch.compile(backbone, dynamic=False) if mode == "compile" else backbone
        self.graph, self.static = None, None

    def _capture(self, x_t: Tensor, t: Tensor, cond) -> None:
        """Warm up on a side stream, then record one call into a CUDA graph with static inputs and output."""
        self.static = (x_t.clone(), t.clone(), _clone(cond))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.backbone(*self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.backbone(*self.static)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        if self.mode != "graph":
            return self.fn(x_t, t, cond)
        if self.graph is None:
            self._capture(x_t, t, cond)
        x, tt, c = self.static
        x.copy_(x_t), tt.copy_(t), _copy(c, cond)
        self.graph.replay()
        return self.out.clone()

    def base_model(self) -> Callable:
        """The base model through the fast call (the buffers hold θ)."""
        self.weights.reset()
        return self


def _clone(cond):
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in cond.items()} if isinstance(cond, dict) \
        else cond.clone()


def _copy(dst, src) -> None:
    if isinstance(dst, dict):
        for k, v in dst.items():
            if isinstance(v, Tensor):
                v.copy_(src[k])
    else:
        dst.copy_(src)


def fast_targets(method) -> list[str]:
    """The module names of a method's LoRA targets."""
    return [t.name for t in lora.find_targets(method.backbone.model, method.cfg.targets)]
