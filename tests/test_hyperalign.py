"""hyperalign.py on tiny random SD / FLUX models: Δθ = 0 at init gives exactly the base samples; variants S / I / P make
LoRA weights when they should; P's key steps are deterministic; gradients reach only the hypernetwork; sizes."""
import pytest
import torch
from conftest import rel_err
from tiny import make_ha, pref_pairs, redness, tiny_pipe

import hyperalign as H
import losses
import prefs
from flux import Flux, FluxConfig
from unet import make_unet


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_untrained_hypernetwork_gives_exactly_the_base_samples(kind):
    pipe = tiny_pipe(kind)
    ha = make_ha(pipe, "S")
    factors = ha.factors(pipe.noise(2, torch.Generator().manual_seed(0)), pipe.t_batch(pipe.timesteps()[0], 2),
                         pipe.conds(["a", "b"])[0])
    R = ha.cfg.rank
    for A, B in factors.values():          # [B − B⁰, B⁰] · [M A ; M A − M⁰ A⁰]: each product has a zero factor
        assert A.shape[1] == B.shape[2] == 2 * R
        assert torch.count_nonzero(B[..., :R]) == 0 and torch.count_nonzero(A[:, R:]) == 0
        assert A[:, :R].abs().sum() > 0 and B[..., R:].abs().sum() > 0 and torch.count_nonzero(B @ A) == 0
    prompts = ["a red circle", "a blue square", "two green things"]
    for n in (1, 3):                                                     # 1: merged path, 3: per-sample vmap
        cond, uncond = pipe.conds(prompts[:n])
        x_T = pipe.noise(n, torch.Generator().manual_seed(1))
        base = pipe.rollout(pipe.backbone, x_T, cond, uncond)["x_t"][-1]
        ours = pipe.rollout(ha.sampler_model(cond, pipe.steps), x_T, cond, uncond)["x_t"][-1]
        if n == 1:
            assert torch.equal(ours, base)
        else:  # vmap turns the linears into batched matmuls: equal up to float rounding
            assert rel_err(ours, base) < 1e-5


@pytest.mark.parametrize("kind", ["vp", "flow"])
@pytest.mark.parametrize("variant", ["S", "P"])
def test_a_batch_samples_what_each_sample_samples_alone(kind, variant):
    """A trained (non-zero) hypernetwork: three prompts sampled as one batch (per-sample LoRAs, each made from its own
    sample's state; on SD with classifier-free guidance, each sample's two copies adjacent) = each prompt alone (one
    merged LoRA), to float rounding. Catches a LoRA or a state taken from another sample's rows."""
    pipe = tiny_pipe(kind)
    ha = make_ha(pipe, variant, key_steps=(0, 2), key_of=4)
    with torch.no_grad():
        for p in ha.hypernet.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["a red circle", "a blue square", "two green things"]
    x_T = pipe.noise(3, torch.Generator().manual_seed(1))
    cond, uncond = pipe.conds(prompts)
    batch = pipe.rollout(ha.sampler_model(cond, pipe.steps), x_T, cond, uncond, trajectory=False)
    alone = []
    for i, prompt in enumerate(prompts):
        c, u = pipe.conds([prompt])
        alone.append(pipe.rollout(ha.sampler_model(c, pipe.steps), x_T[i:i + 1], c, u, trajectory=False))
    base = pipe.rollout(pipe.backbone, x_T, cond, uncond, trajectory=False)
    assert rel_err(batch, torch.cat(alone)) < 1e-5 and rel_err(batch, base) > 1e-3


def test_variants_make_lora_weights_at_their_steps_and_training_agrees():
    pipe = tiny_pipe("vp", steps=6)
    ts = pipe.timesteps()
    calls = {}
    for variant in H.VARIANTS:
        ha = make_ha(pipe, variant, key_steps=(0, 2, 4), key_of=6)
        seen = []
        ha.factors = (lambda f: lambda x, t, c, net=None: seen.append(int(t[0])) or f(x, t, c, net))(ha.factors)
        cond, uncond = pipe.conds(["a"])
        pipe.rollout(ha.sampler_model(cond, pipe.steps), pipe.noise(1, torch.Generator().manual_seed(0)), cond,
                     uncond)
        calls[variant] = seen
        # the training step asks the same rule for the state that made step k's LoRA
        starts = {H.lora_step(variant, k, ha.cfg.key_steps_for(6)) for k in range(len(ts))}
        assert [ts[s] for s in sorted(starts)] == seen
    assert calls == {"S": ts, "I": [ts[0]], "P": [ts[0], ts[2], ts[4]]}


def test_key_steps_rescale_to_other_trajectory_lengths():
    cfg = H.HyperConfig.preset("toy-sd", variant="P", key_steps=(0, 2, 5), key_of=10)
    assert cfg.key_steps_for(10) == (0, 2, 5) and cfg.key_steps_for(20) == (0, 4, 10)
    assert cfg.key_steps_for(4) == (0, 1, 2)


def test_key_steps_rule_and_determinism():
    # x0_hat moves steadily, then jumps at step 5: the curvature of the relative change peaks around there
    N = 10
    x = torch.ones(N, 2, 4) + 0.01 * torch.arange(N).view(N, 1, 1)
    x[5:] += 1.0
    delta, kappa = H.curvature(x)
    assert delta.shape == (9, 2) and kappa.shape == (8, 2) and delta[4].max() == delta.max()  # delta_5: x0_hat_5 vs x0_hat_4
    steps = H.key_steps(x, 2)
    assert steps[0] == 0 and 5 in steps and len(steps) == 3
    pipe = tiny_pipe("vp", steps=8)
    ha = make_ha(pipe, "P")
    a = H.calibrate(ha, pipe, ["a red circle", "a blue square"], 3, seed=0)
    assert ha.cfg.key_steps == tuple(a) and ha.cfg.key_of == 8
    b = H.calibrate(ha, pipe, ["a red circle", "a blue square"], 3, seed=0)
    assert a == b and len(a) == 4 and a[0] == 0 and a == sorted(a)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_the_decoder_learns_from_the_first_step_and_only_the_hypernetwork_gets_gradients(kind):
    pipe = tiny_pipe(kind)
    ha = make_ha(pipe, "S")
    batch = next(prefs.stream(pref_pairs(), 2, 16))
    losses.training_step(ha, pipe, redness, ["a", "b"], batch, 1.0, torch.Generator().manual_seed(0))
    net = ha.hypernet
    frozen = [*pipe.backbone.model.parameters(), *pipe.vae.parameters(), *net.decoder0.parameters(), *net.a0, *net.b0]
    assert all(p.grad is None for p in frozen)                    # generator, VAE and the frozen ⁰ copies untouched
    grads = {n: p.grad for n, p in ha.hypernet.decoder.named_parameters()}
    # Δθ = 0 at init, yet every weight of the decoder gets a gradient at the first step (the queries too: zero at
    # init, they still feed the attention)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    # and so does every A_T and B_T: no factor of the learned LoRA is zero at the start
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*net.a, *net.b])


def test_every_number_of_delta_theta_depends_on_the_input():
    """No static path: with the decoder moved off its initial copy, two inputs give different Δθ in every target, and
    a static Δθ would need a constant M(x)."""
    pipe = tiny_pipe("vp")
    ha = make_ha(pipe, "I")
    with torch.no_grad():
        for p in ha.hypernet.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cond = pipe.conds(["a red circle", "a blue square"])[0]
    f = ha.factors(pipe.noise(2, torch.Generator().manual_seed(0)), pipe.t_batch(pipe.timesteps()[0], 2), cond)
    for A, B in f.values():
        d = B @ A                                                       # (2, O, I): Δθ / s per sample
        assert not torch.allclose(d[0], d[1])
    trainable = {n.split(".")[0] for n, p in ha.hypernet.named_parameters() if p.requires_grad}
    assert trainable == {"decoder", "a", "b"}                          # no other parameter reaches Δθ


def fit_prompt_dependent_lora(ha, pipe, steps: int = 300, lr: float = 1e-3) -> tuple[float, float]:
    """Train the hypernetwork alone to write Δθ = +u for one prompt and -u for another (u: unit norm, inside the
    LoRA's initial subspace, so reachable), from 6 noises; -> (loss, adaptivity) on 2 other noises. Δθ = 0 scores
    loss 1; one static LoRA cannot do better than that."""
    import diagnostics
    net, prompts = ha.hypernet, ["a red square", "a blue circle"]
    cond = pipe.conds(prompts)[0]
    t = pipe.t_batch(pipe.timesteps()[0], 2)
    with torch.no_grad():
        feats = [ha.backbone.features(pipe.noise(2, torch.Generator().manual_seed(s)), t, cond) for s in range(8)]
    g = torch.Generator().manual_seed(1)
    u = torch.cat([(b0 @ torch.randn(b0.shape[1], a0.shape[0], generator=g) @ a0).flatten()
                   for a0, b0 in zip(net.a0, net.b0)])
    target = torch.stack([u, -u]) / u.norm()

    def delta(f):
        return torch.cat([(ha.cfg.scale * B @ A).flatten(1) for A, B in net(*f).values()], 1)

    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    for i in range(steps):
        loss = (delta(feats[i % 6]) - target).square().sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        d = torch.cat([delta(f) for f in feats[6:]])
    return (d - target.repeat(2, 1)).square().sum(1).mean().item(), diagnostics.adaptivity(d)


def test_the_hypernetwork_can_learn_a_lora_that_depends_on_the_prompt(monkeypatch):
    """The mechanism HyperAlign rests on, in isolation: asked for opposite LoRAs for two prompts, it writes them
    (loss 1 -> < 0.05, adaptivity ~1). With the decoder's head at nn.Linear's default scale (HEAD_GAIN = 1) the same
    training ends above loss 1, worse than Δθ = 0: the head's initial scale is what lets the LoRA adapt."""
    torch.manual_seed(0)
    pipe = tiny_pipe("vp", steps=3)
    loss, adaptivity = fit_prompt_dependent_lora(make_ha(pipe, "I"), pipe)
    assert loss < 0.05 and adaptivity > 0.95, (loss, adaptivity)
    monkeypatch.setattr(H, "HEAD_GAIN", 1.0)
    torch.manual_seed(0)
    loss, _ = fit_prompt_dependent_lora(make_ha(pipe, "I"), pipe)
    assert loss > 1.0, loss


@pytest.mark.parametrize("mode", ["one-step", "direct-align"])
def test_reward_modes_train_both_processes(mode):
    """L_R's two modes run on VP and flow; direct-align recovers x0 exactly when the prediction is the true noise."""
    for kind in ("vp", "flow"):
        pipe = tiny_pipe(kind)
        ha = make_ha(pipe, "S")
        log = losses.training_step(ha, pipe, redness, ["a", "b"], None, 0.0, torch.Generator().manual_seed(0),
                              reward_mode=mode)
        assert torch.isfinite(torch.tensor(log["loss"]))
        shape = pipe.noise(2, torch.Generator()).shape
        x0, eps = torch.randn(shape), torch.randn(shape)
        for t, t_next in pipe.pairs()[:-1]:
            tb, tn = pipe.t_batch(t, 2), pipe.t_batch(t_next, 2)
            bb = pipe.backbone
            x_t = bb.noised(x0, eps, tb)
            pred = bb.target(x0, eps, tb)                       # the perfect prediction
            assert rel_err(bb.recover(pipe.step(x_t, pred, t, t_next)[0], eps, tn), x0) < 1e-4


def test_parameter_counts_sd15_and_flux():
    """The trainable parameter counts stated in the README / tutorial (counted on the meta device)."""
    assert H.count_params(H.HyperConfig.preset("sd15"), lambda: make_unet("sd15")) == 13_026_304
    assert H.count_params(H.HyperConfig.preset("flux-dev"), lambda: Flux(FluxConfig.preset("flux-dev"))) == 20_944_896
