"""hyperalign.py on tiny random SD / FLUX models: Δθ = 0 at init gives exactly the base samples; variants S / I / P make
LoRA weights when they should; P's key steps are deterministic; gradients reach only the hypernetwork; sizes."""
import pytest
import torch
from PIL import Image

import hyperalign as H
import sampler
import train
from conftest import rel_err
from flux import Flux, FluxConfig
from unet import make_unet
from vae import make_vae


def tiny_pipe(kind: str = "vp", steps: int = 4, guidance: float = 3.0, seed: int = 0) -> train.Pipe:
    """A random tiny pipeline: toy-sd U-Net or flux-tiny, a toy-sd VAE (4 latent channels, 16 px -> 8 x 8 latents) and
    a fixed random word embedding as the text encoder."""
    torch.manual_seed(seed)
    vae = make_vae("toy-sd").eval().requires_grad_(False)
    emb = torch.nn.Embedding(64, 32).requires_grad_(False)

    def ids(prompts):
        return torch.tensor([[sum(map(ord, w)) % 64 for w in (p.split() + ["_"] * 5)[:5]] for p in prompts])

    if kind == "vp":
        unet = make_unet("toy-sd").eval().requires_grad_(False)
        return train.Pipe(H.Backbone("vp", unet, sampler.VPSchedule.from_config(None)), vae,
                          lambda p: emb(ids(p)), 16, steps, guidance)
    flux = Flux(FluxConfig.preset("flux-tiny")).eval().requires_grad_(False)
    return train.Pipe(H.Backbone("flow", flux), vae, lambda p: (emb(ids(p)), emb(ids(p)).mean(1)), 16, steps, 3.5)


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


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_untrained_hypernetwork_gives_exactly_the_base_samples(kind):
    pipe = tiny_pipe(kind)
    ha = make_ha(pipe, "S")
    for A, B in ha.factors(pipe.noise(2, torch.Generator().manual_seed(0), "cpu"), pipe.t_batch(pipe.timesteps()[0],
                           2, "cpu"), pipe.conds(["a", "b"])[0]).values():
        assert A.abs().sum() > 0 and torch.count_nonzero(B) == 0          # Δθ = s B A = 0 exactly
    prompts = ["a red circle", "a blue square", "two green things"]
    for n in (1, 3):                                                     # 1: merged path, 3: per-sample vmap
        cond, uncond = pipe.conds(prompts[:n])
        x_T = pipe.noise(n, torch.Generator().manual_seed(1), "cpu")
        base = pipe.rollout(lambda x, t, c: ha.predict(None, x, t, c), x_T, cond, uncond)["x_t"][-1]
        ours = pipe.rollout(ha.sampler_model(cond), x_T, cond, uncond)["x_t"][-1]
        if n == 1:
            assert torch.equal(ours, base)
        else:  # vmap turns the linears into batched matmuls: equal up to float rounding
            assert rel_err(ours, base) < 1e-5


def test_variants_make_lora_weights_at_their_steps():
    pipe = tiny_pipe("vp", steps=6)
    ts = pipe.timesteps()
    calls = {}
    for variant in H.VARIANTS:
        ha = make_ha(pipe, variant, key_times=(ts[0], ts[2], ts[4]))
        seen = []
        ha.factors = (lambda f: lambda x, t, c: seen.append(int(t[0])) or f(x, t, c))(ha.factors)
        cond, uncond = pipe.conds(["a"])
        pipe.rollout(ha.sampler_model(cond), pipe.noise(1, torch.Generator().manual_seed(0), "cpu"), cond, uncond)
        calls[variant] = seen
        # the training step reconstructs the same segment starts
        starts = {train.start_step(variant, k, [0, 2, 4]) for k in range(len(ts))}
        assert [ts[s] for s in sorted(starts)] == seen
    assert calls == {"S": ts, "I": [ts[0]], "P": [ts[0], ts[2], ts[4]]}


def test_key_steps_rule_and_determinism():
    # x0_hat moves steadily, then jumps at step 5: the curvature of the relative change peaks around there
    N = 10
    x = torch.ones(N, 2, 4) + 0.01 * torch.arange(N).view(N, 1, 1)
    x[5:] += 1.0
    steps = H.key_steps(x, 2)
    assert steps[0] == 0 and 5 in steps and len(steps) == 3
    pipe = tiny_pipe("vp", steps=8)
    ha = make_ha(pipe, "P")
    a = train.calibrate(ha, pipe, ["a red circle", "a blue square"], 3, seed=0)
    times = ha.cfg.key_times
    b = train.calibrate(ha, pipe, ["a red circle", "a blue square"], 3, seed=0)
    assert a == b and ha.cfg.key_times == times and len(a) == 4 and a[0] == 0


def test_only_the_hypernetwork_gets_gradients():
    pipe = tiny_pipe("vp")
    ha = make_ha(pipe, "S")
    pairs = list(train.pref_stream(pref_pairs(), 2, 16, 0).__next__() for _ in range(1))[0]
    train.train_step(ha, pipe, redness, ["a", "b"], pairs, 1.0, torch.Generator().manual_seed(0), [])
    frozen = [*pipe.backbone.model.parameters(), *pipe.vae.parameters()]
    assert all(p.grad is None for p in frozen)
    grads = {n: p.grad for n, p in ha.hypernet.named_parameters()}
    assert all(g is not None for g in grads.values())
    # at init B_aux = 0, so only B_aux receives a non-zero gradient (as with LoRA's B = 0 init)
    assert all(grads[f"b_aux.{i}"].abs().sum() > 0 for i in range(len(ha.hypernet.targets)))
    assert sum(p.grad.abs().sum() for n, p in ha.hypernet.named_parameters() if "aux" not in n) == 0


def test_parameter_counts_sd15_and_flux():
    """The trainable parameter counts stated in the README / tutorial (counted on the meta device)."""
    assert H.count_params(H.HyperConfig.preset("sd15"), lambda: make_unet("sd15")) == 11_481_152
    assert H.count_params(H.HyperConfig.preset("flux-dev"), lambda: Flux(FluxConfig.preset("flux-dev"))) == 17_271_872
