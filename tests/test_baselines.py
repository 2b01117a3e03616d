"""baselines.py on tiny random SD / FLUX pipelines: the static LoRA starts as the base model and moves with training
(and raises the reward); Best-of-N keeps the best candidate; gradient guidance raises the reward over the base sample
from the same noise; Direct-Align recovers x0 exactly for a perfect model and trains; checkpoints round-trip."""
import pytest
import torch

import baselines as BL
import hyperalign as H
from conftest import rel_err
from test_hyperalign import pref_pairs, redness, tiny_pipe

PROMPTS = ["a red square", "a blue circle"]


def cfg(pipe, **kw):
    return H.HyperConfig.preset("toy-sd" if pipe.kind == "vp" else "toy-flux", **kw)


def sample(pipe, model, x_T):
    cond, uncond = pipe.conds(PROMPTS)
    return pipe.rollout(model, x_T, cond, uncond)["x_t"][-1]


def test_static_lora_starts_as_the_base_model_then_moves_and_raises_the_reward():
    pipe = tiny_pipe("vp", steps=3)
    x_T = pipe.noise(2, torch.Generator().manual_seed(1), "cpu")
    sl = BL.StaticLoRA(cfg(pipe), pipe.backbone)
    base = sample(pipe, BL.base_model(pipe), x_T)
    assert torch.equal(sample(pipe, sl.sampler_model(), x_T), base)                 # B = 0: exactly the base model
    sl, logs = BL.train_static(pipe, redness, PROMPTS, cfg(pipe), steps=4, batch_size=2, lr=2e-2, lam=0.1,
                               prefs_reader=pref_pairs())
    assert all(p.grad is not None for p in sl.parameters())                        # gradients reached A and B
    assert not any(p.requires_grad for p in pipe.backbone.model.parameters())      # the generator stays frozen
    tuned = sample(pipe, sl.sampler_model(), x_T)
    assert rel_err(tuned, base) > 1e-3
    assert redness(pipe.decode(tuned), PROMPTS).mean() > redness(pipe.decode(base), PROMPTS).mean()
    assert logs[-1]["loss_g"] > 0 and [r["step"] for r in logs] == [1, 2, 3, 4]


def test_static_lora_checkpoint_round_trip(tmp_path):
    pipe = tiny_pipe("vp", steps=2)
    sl, _ = BL.train_static(pipe, redness, PROMPTS, cfg(pipe), steps=1, batch_size=2, lr=1e-2, lam=0.0,
                            out=str(tmp_path))
    back, saved = BL.load_static(str(tmp_path), pipe.backbone)
    assert saved["run"]["method"] == "reward"
    for (a1, b1), (a2, b2) in zip(sl.factors().values(), back.factors().values()):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
    with pytest.raises(ValueError, match="no static LoRA"):
        BL.load_static(str(tmp_path / "missing"), pipe.backbone)


def test_best_of_n_keeps_the_highest_reward_candidate():
    pipe = tiny_pipe("vp", steps=2)
    g = torch.Generator().manual_seed(3)
    x_T = torch.stack([pipe.noise(2, g, "cpu") for _ in range(3)])                  # (N, B, C, h, w)
    images, scores, picked = BL.best_of_n(pipe, redness, PROMPTS, x_T)
    assert scores.shape == (3, 2) and torch.equal(picked, scores.argmax(0))
    assert torch.allclose(redness(images, PROMPTS), scores.max(0).values)
    for b in range(2):                                                             # the kept image is that sample
        one = pipe.decode(sample(pipe, BL.base_model(pipe), x_T[picked[b]]))[b]
        assert torch.allclose(images[b], one, atol=1e-6)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_guidance_raises_the_reward_over_the_base_sample_from_the_same_noise(kind):
    pipe = tiny_pipe(kind, steps=3)
    x_T = pipe.noise(2, torch.Generator().manual_seed(0), "cpu")
    base = pipe.decode(sample(pipe, BL.base_model(pipe), x_T))
    guided = pipe.decode(BL.guidance_sample(pipe, redness, PROMPTS, x_T, rho=1.0))
    assert (redness(guided, PROMPTS) > redness(base, PROMPTS)).all()
    zero = pipe.decode(BL.guidance_sample(pipe, redness, PROMPTS, x_T, rho=0.0))    # ρ = 0: the base sampler
    assert rel_err(zero, base) < 1e-5


def test_direct_align_recovers_x0_exactly_for_a_perfect_model():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    t, t_next = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.3, 0.0])
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    assert rel_err(BL.direct_align_x0(x_t, eps - x0, eps, t, t_next), x0) < 1e-6  # v = eps - x0 is the true velocity
    assert rel_err(BL.direct_align_x0(x_t, torch.zeros_like(x0), eps, t, t_next), x0) > 0.1


def test_direct_align_trains_a_static_lora_on_flux():
    pipe = tiny_pipe("flow", steps=2)
    sl, logs = BL.train_static(pipe, redness, PROMPTS, cfg(pipe), steps=2, batch_size=2, lr=1e-2,
                               method="direct-align")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert any(b.abs().sum() > 0 for b in sl.B)                                    # the LoRA moved off zero
    with pytest.raises(ValueError, match="rectified-flow"):
        BL.direct_align_step(BL.StaticLoRA(cfg(tiny_pipe("vp")), tiny_pipe("vp").backbone), tiny_pipe("vp"),
                             redness, PROMPTS, torch.Generator())


def test_srpo_relative_reward_matches_the_clip_formula_and_wraps_any_reward():
    seen = []

    def r(images, prompts):                      # records the prompts it scores; depends on them through their length
        seen.append(list(prompts))
        return images.mean((1, 2, 3)) * torch.tensor([len(p) for p in prompts], dtype=torch.float32)

    rel = BL.srpo_reward(r, k=1.0)
    images = torch.rand(2, 3, 4, 4)
    out = rel(images, PROMPTS)
    assert seen == [[f"Realistic photo. {p}" for p in PROMPTS], [f"Painting. {p}" for p in PROMPTS]]
    m = images.mean((1, 2, 3))
    want = 2 * m * torch.tensor([len(f"Realistic photo. {p}") for p in PROMPTS]) - \
        m * torch.tensor([len(f"Painting. {p}") for p in PROMPTS])
    assert torch.allclose(out, want)


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    for bad in (["--method", "nope"], ["--model", str(tmp_path / "missing"), "--reward", "toy-pref", "--prompts",
                                       str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            BL.main(bad)
        assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
