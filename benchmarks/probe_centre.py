"""A fix tried for HyperAlign's probe (docs/results.md §7), not adopted: the decoder head's input centred by its mean
over the training prompts at initialisation, so that the head reads how a prompt differs from the others.

    python benchmarks/probe_centre.py [probe_adaptive.py's flags]

The hypernetwork's head reads LayerNorm'd decoder tokens h whose larger part is the same for every prompt (a relation
flip moves h by ~0.4 of its norm). Here the head reads h − h̄₀ instead, h̄₀ the mean of h over the training prompts
for the decoder at initialisation (its frozen copy decoder⁰, so a loaded run gets the centre it trained with), from
a fixed x_T at the first step. Δθ stays 0 at initialisation. The decoder's forward and HyperAlign's construction are
replaced for this process only; nothing else changes.
"""
from __future__ import annotations

import os
import sys

import torch
from einops import rearrange

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import config  # noqa: E402
import hyperalign  # noqa: E402
import probe_adaptive as probe  # noqa: E402
import runs  # noqa: E402


def centred_forward(self, levels, text, emb):
    """hyperalign.Decoder.forward with the head reading h − centre (none while the centre is being measured)."""
    dtype = self.head.weight.dtype
    sources = [*levels, text, emb[:, None]]
    kv = torch.cat([p(x.to(dtype)) + self.source[j] for j, (p, x) in enumerate(zip(self.proj, sources))], 1)
    q = (self.queries + self.pos).expand(kv.shape[0], -1, -1)
    for layer in self.layers:
        q = layer(q, kv)
    self.h = self.ln_f(q)
    centre = getattr(self, "centre", None)
    return rearrange(self.head(self.h if centre is None else self.h - centre), "B T (R S) -> B T R S", R=self.rank)


def set_centre(ha, pipe, prompts: list[str]) -> None:
    with torch.no_grad():
        d0 = ha.hypernet.decoder0
        d0.centre = None
        cond, _ = pipe.conds(prompts)
        t = pipe.t_batch(pipe.timesteps()[0], len(prompts))
        d0(*ha.backbone.features(pipe.noise(len(prompts), torch.Generator().manual_seed(12345)), t, cond))
        ha.hypernet.decoder.centre = d0.centre = d0.h.mean(0)                             # (T, D)


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
    hyperalign.Decoder.forward, hyperalign.HyperAlign.__init__ = centred_forward, centred_init
    runs.load_trained = centred_load
    argv = list(sys.argv[1:] if argv is None else argv)
    probe.main(argv if "--tag" in argv else [*argv, "--tag", "head input centred"])


if __name__ == "__main__":
    main()
