"""Tiny random pipelines and stand-ins shared by the method tests (nothing is downloaded or trained)."""
import torch
from PIL import Image

import hyperalign as H
import pipeline
import sampler
from backbone import VP, Flow
from flux import Flux, FluxConfig
from unet import make_unet
from vae import make_vae

PROMPTS = [f"a red square number {i}" for i in range(6)]


def tiny_pipe(kind: str = "vp", steps: int = 4, guidance: float = 3.0, seed: int = 0) -> pipeline.Pipeline:
    """A random tiny pipeline: toy-sd U-Net or flux-tiny, a toy-sd VAE (4 latent channels, 16 px -> 8 x 8 latents) and
    a fixed random word embedding as the text encoder."""
    torch.manual_seed(seed)
    vae = make_vae("toy-sd").eval().requires_grad_(False)
    emb = torch.nn.Embedding(64, 32).requires_grad_(False)

    def ids(prompts):
        return torch.tensor([[sum(map(ord, w)) % 64 for w in (p.split() + ["_"] * 5)[:5]] for p in prompts])

    if kind == "vp":
        unet = make_unet("toy-sd").eval().requires_grad_(False)
        return pipeline.Pipeline(VP(unet, sampler.VPSchedule.from_config(None)), vae,
                                 lambda p: emb(ids(p)), 16, 16, steps, guidance)
    flux = Flux(FluxConfig.preset("flux-tiny")).eval().requires_grad_(False)
    return pipeline.Pipeline(Flow(flux), vae, lambda p: (emb(ids(p)), emb(ids(p)).mean(1)), 16, 16,
                             steps, 3.5)


def redness(images, prompts):
    """A differentiable stand-in reward: how much redder than green and blue the image is."""
    return images[:, 0].mean((1, 2)) - images[:, 1:].mean((1, 2, 3))


def pref_pairs(n: int = 8):
    from prefs import PrefPair
    red, green = Image.new("RGB", (16, 16), (220, 20, 20)), Image.new("RGB", (16, 16), (20, 220, 20))
    return [PrefPair(f"a red square {i}", red, green, f"pair {i}") for i in range(n)]


def make_ha(pipe, variant="I", **kw) -> H.HyperAlign:
    preset = "toy-sd" if pipe.kind == "vp" else "toy-flux"
    return H.HyperAlign(H.HyperConfig.preset(preset, variant=variant, **kw), pipe.backbone)


def prompt_file(tmp_path, name: str = "prompts.txt", prompts=PROMPTS) -> str:
    path = tmp_path / name
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def run_cfg(out, tmp_path, kind: str = "vp", **kw):
    """A RunConfig for a tiny pipeline: prompt files, two held-out prompts, a small batch, quick checkpoints."""
    from config import RunConfig
    base = dict(preset="toy-sd" if kind == "vp" else "toy-flux", hyper="toy-sd" if kind == "vp" else "toy-flux",
                prompts=prompt_file(tmp_path), eval_prompts=prompt_file(tmp_path, "eval.txt", PROMPTS[:2]),
                batch_size=2, n_eval=2, eval_seeds=1, save_every=2, lr=1e-2, steps=4, out=str(out))
    return RunConfig(**{**base, **kw}).check()


def train_run(kind: str, cfg, *args, **kw) -> dict:
    """runs.train for a run of `kind` ("hyperalign" or "static") with the architecture of RunConfig `cfg`."""
    import methods
    import runs
    return runs.train(methods.builder(kind, cfg), cfg, *args, **kw)
