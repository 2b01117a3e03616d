"""diagnostics.py and analysis.py: adaptivity and PCA on known inputs; the curvature numbers follow hyperalign's key-step
rule; LoRA dynamics and PCA of a hypernetwork have the right shapes, are deterministic, and the figures are PNGs."""
import pytest
import torch
from tiny import make_ha, tiny_pipe

import analysis as A
import diagnostics as D
import hyperalign as H
import methods

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def trained_like(pipe, variant="S"):
    """A hypernetwork with Δθ != 0: B_aux and the head randomised, as training would move them."""
    ha = make_ha(pipe, variant)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ha.hypernet.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ha


def test_adaptivity_on_known_inputs():
    v = torch.randn(10)
    assert D.adaptivity(v.expand(4, 10)) == pytest.approx(0.0, abs=1e-12)          # one LoRA for all: static
    assert D.adaptivity(torch.stack([v, -v])) == pytest.approx(1.0)                 # averages out: all adaptation
    e = torch.eye(4)                                                                # shared part + orthogonal parts
    d = torch.stack([e[0] + e[i] for i in (1, 2, 3)])                               # |shared|² = 1, |own|² = 1
    assert D.adaptivity(d) == pytest.approx((2 / 3) / 2)                            # between-input share of E|Δθ|²
    assert D.adaptivity(torch.zeros(3, 5)) == 0.0


def test_pca_recovers_known_components():
    g = torch.Generator().manual_seed(0)
    a, b = torch.zeros(50), torch.zeros(50)
    a[0], b[1] = 1.0, 1.0
    c = torch.randn(40, 2, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(c - c.mean(0))                        # centred, orthonormal columns
    c = q * torch.tensor([3.0, 1.0], dtype=torch.float64)        # variances 9 : 1 along a and b
    d = c[:, :1] * a + c[:, 1:] * b + 5.0                        # an offset PCA must remove
    xy, explained = D.pca(d)
    assert torch.allclose(explained, torch.tensor([0.9, 0.1]), atol=1e-6)
    assert torch.allclose(xy[:, 0].double().abs(), c[:, 0].abs(), atol=1e-5) and xy[0, 0] >= 0


def test_static_lora_has_adaptivity_zero_and_hyperalign_more():
    pipe = tiny_pipe("vp", steps=3)
    sl = methods.StaticLoRA(H.HyperConfig.preset("toy-sd"), pipe.backbone)
    with torch.no_grad():
        for b in sl.B:
            b.normal_(0, 0.05)
    assert D.at_x_T(sl, pipe, PROMPTS, [0, 1])["adaptivity"] == pytest.approx(0.0, abs=1e-12)
    ha = trained_like(pipe)
    at = D.at_x_T(ha, pipe, PROMPTS, [0, 1])
    assert 0 < at["adaptivity"] < 1 and 0 <= at["adaptivity_prompts"] <= at["adaptivity"] + 1e-12


def test_curvature_numbers_follow_the_key_step_rule_and_are_deterministic():
    x0 = torch.randn(6, 2, 4, 3, 3)
    delta, kappa = H.curvature(x0)
    assert delta.shape == (5, 2) and kappa.shape == (4, 2)
    manual = (x0[3, 1] - x0[2, 1]).norm() / x0[2, 1].norm()
    assert torch.allclose(delta[2, 1], manual.double())
    top = int(kappa.mean(1).argmax()) + 1
    assert top in H.key_steps(x0, 1)                            # the largest mean curvature is a key step
    pipe = tiny_pipe("vp", steps=5)
    c1, c2 = A.curvature_data(pipe, PROMPTS, k=2), A.curvature_data(pipe, PROMPTS, k=2)
    assert torch.equal(c1["delta"], c2["delta"]) and c1["key_steps"] == c2["key_steps"]
    assert c1["delta"].shape == (4, 3) and c1["key_steps"][0] == 0 and len(c1["key_steps"]) == 3


def test_lora_dynamics_and_pca_shapes_determinism_and_pngs(tmp_path):
    pipe = tiny_pipe("vp", steps=4)
    ha = trained_like(pipe)
    d1, d2 = D.along_trajectory(ha, pipe, PROMPTS), D.along_trajectory(ha, pipe, PROMPTS)
    assert d1["cos_first"].shape == (4, 3) and d1["change"].shape == (3, 3)
    assert torch.equal(d1["cos_first"], d2["cos_first"])
    assert torch.allclose(d1["cos_first"][0], torch.ones(3, dtype=torch.float64))   # Δθ_first vs itself
    assert (d1["change"] > 0).all()                                                 # S makes new weights each step
    p1, p2 = D.at_x_T(ha, pipe, PROMPTS, [0, 1]), D.at_x_T(ha, pipe, PROMPTS, [0, 1])
    assert p1["xy"].shape == (6, 2) and p1["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(p1["xy"], p2["xy"])
    assert torch.allclose(p1["explained"], D.pca(p1["delta"])[1])
    A.plot_curvature(A.curvature_data(pipe, PROMPTS), str(tmp_path / "c.png"))
    A.plot_dynamics(d1, str(tmp_path / "d.png"))
    A.plot_pca(p1, PROMPTS, str(tmp_path / "p.png"))
    for f in ("c.png", "d.png", "p.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("variant", ["I", "S", "P"])
def test_averaged_applies_the_mean_of_the_loras_as_used(variant):
    """diagnostics.Averaged: W + the mean over inputs of the LoRAs the sampler made, each weighted by the steps it
    serves; for I that is the mean of Δθ at x_T (delta_theta), and its samples differ from HyperAlign's."""
    pipe = tiny_pipe("vp", steps=3)
    ha = trained_like(pipe, variant)
    ha.cfg.key_steps, ha.cfg.key_of = (2,), 3                       # P: segments [0, 1] and [2]
    avg = D.Averaged(ha, pipe, PROMPTS, [5, 6])
    cond, uncond = pipe.conds(PROMPTS)
    expect, n = 0, 0
    for s in (5, 6):
        model = ha.sampler_model(cond, pipe.steps)
        model.keep = True
        pipe.rollout(model, pipe.noise(3, torch.Generator().manual_seed(s)), cond, uncond)
        weights = {"I": [3], "S": [1, 1, 1], "P": [2, 1]}[variant]
        assert [k for k, _ in model.made] == {"I": [0], "S": [0, 1, 2], "P": [0, 2]}[variant]
        for (_, f), w in zip(model.made, weights):
            expect = expect + w / 3 * torch.cat([(ha.cfg.scale * B @ A).sum(0).flatten() for A, B in f.values()])
        n += 3
    got = torch.cat([(avg.params[f"{k}.weight"] - pipe.backbone.model.get_submodule(k).weight).flatten()
                     for k in [t.name for t in ha.hypernet.targets]])
    assert torch.allclose(got, expect / n, atol=1e-6)
    if variant == "I":
        t0 = pipe.t_batch(pipe.timesteps()[0], 3)
        mean = torch.cat([D.delta_theta(ha, pipe.noise(3, torch.Generator().manual_seed(s)), t0, cond)
                          for s in (5, 6)]).mean(0)
        assert torch.allclose(got, mean, atol=1e-6)
    x_T = pipe.noise(3, torch.Generator().manual_seed(0))
    a = pipe.rollout(avg.sampler_model(cond, 3), x_T, cond, uncond, trajectory=False)
    b = pipe.rollout(ha.sampler_model(cond, 3), x_T, cond, uncond, trajectory=False)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)


def test_attention_weights_are_the_ones_forward_uses():
    """hyperalign.Attention.weights: softmax(q kᵀ / √d) per head; weights · v, then o, is forward's output."""
    torch.manual_seed(0)
    att = H.Attention(16, 4)
    x, kv = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    w = att.weights(x, kv)                                                          # (B, N, L_x, L_kv)
    assert w.shape == (2, 4, 3, 7) and torch.allclose(w.sum(-1), torch.ones(2, 4, 3))
    v = att.v(kv).view(2, 7, 4, 4).transpose(1, 2)                                  # (B, N, L_kv, D)
    by_hand = att.o((w @ v).transpose(1, 2).reshape(2, 3, 16))
    assert torch.allclose(by_hand, att(x, kv), atol=1e-6)


def test_decoder_report_at_initialisation_and_after_a_change():
    """At initialisation the decoder is its frozen copy: every figure equal, nothing moved. Moving the trained copy
    moves `moved`, and the report's attention figures are shares (masses sum to 1, entropy in (0, 1])."""
    pipe = tiny_pipe()
    ha = make_ha(pipe, "I")
    flipped = ["a red circle", "a blue square", "a green circle"]
    r = D.decoder_report(ha, pipe, PROMPTS, flipped)
    assert r["trained"] == r["init"] and r["moved"] == {"head": 0.0, "other_median": 0.0}
    a = r["init"]["attention"][0]
    assert sum(a["mass"].values()) == pytest.approx(1.0) and sum(a["uniform"].values()) == pytest.approx(1.0)
    assert 0 < a["entropy"] <= 1 and r["init"]["M"]["edit"] > 0 and r["init"]["M"]["seed"] > 0
    moved = D.decoder_report(trained_like(pipe, "I"), pipe, PROMPTS, flipped)
    assert moved["moved"]["head"] > 0 and moved["trained"]["M"] != moved["init"]["M"]
