"""A fix tried for HyperAlign's probe (docs/results.md §7), not adopted: the decoder head's input centred by its mean
over the training prompts at initialisation, so that the head reads how a prompt differs from the others.

    python benchmarks/probe_centre.py [probe_adaptive.py's flags]

The hypernetwork's head reads LayerNorm'd decoder tokens h whose larger part is the same for every prompt (a relation
flip moves h by ~0.4 of its norm). Here the head reads h − h̄₀ instead, h̄₀ the mean of h over the training prompts
for the decoder at initialisation (its frozen copy decoder⁰, so a loaded run gets the centre it trained with), from
a fixed x_T at the first step. Δθ stays 0 at initialisation. HyperAlign's construction and the loading of a run are
wrapped for this process only (hooks on the heads); nothing else changes.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config  # noqa: E402
import hyperalign  # noqa: E402
import probe_adaptive as probe  # noqa: E402
import runs  # noqa: E402


def set_centre(ha, pipe, prompts: list[str]) -> None:
    """Measure h̄₀ with decoder⁰ and make both decoders' heads read h − h̄₀ (forward pre-hooks on the heads; any
    centring set before, e.g. at construction when a run is loaded, is removed first)."""
    for hook in getattr(ha, "centre_hooks", []):
        hook.remove()
    d0, seen = ha.hypernet.decoder0, []
    hook = d0.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        cond, _ = pipe.conds(prompts)
        t = pipe.t_batch(pipe.timesteps()[0], len(prompts))
        d0(*ha.backbone.features(pipe.noise(len(prompts), torch.Generator().manual_seed(12345)), t, cond))
    hook.remove()
    centre = seen[0].mean(0)                                                          # (T, D)
    ha.centre_hooks = [d.head.register_forward_pre_hook(lambda m, args: (args[0] - centre,))
                       for d in (ha.hypernet.decoder, d0)]


def main(argv=None) -> None:
    pipe, prompts = config.load_pipeline(config.RunConfig()), probe.split("hyper-train")
    init, load = hyperalign.HyperAlign.__init__, runs.load_trained

    def centred_init(self, cfg, backbone):
        init(self, cfg, backbone)
        set_centre(self, pipe, prompts)

    def centred_load(*args, **kw):
        method, saved = load(*args, **kw)
        if isinstance(method, hyperalign.HyperAlign):
            set_centre(method, pipe, prompts)
        return method, saved
    hyperalign.HyperAlign.__init__ = centred_init
    runs.load_trained = centred_load
    argv = list(sys.argv[1:] if argv is None else argv)
    probe.main(argv if "--tag" in argv else [*argv, "--tag", "head input centred"])


if __name__ == "__main__":
    main()
