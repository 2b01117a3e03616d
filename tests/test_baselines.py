"""methods.py and baselines.py on tiny random SD / FLUX pipelines: the static LoRA starts as the base model, trains
with HyperAlign's own step and raises the reward; Best-of-N keeps the best candidate; gradient guidance raises the
reward over the base sample from the same noise; Direct-Align trains; SRPO's relative reward; checkpoints round-trip."""
import pytest
import torch
from conftest import rel_err
from tiny import pref_pairs, redness, run_cfg, tiny_pipe, train_run

import baselines
import hyperalign as H
import losses
import methods
import rewards
import runs
import testtime

PROMPTS = ["a red square", "a blue circle"]


def cfg(pipe, **kw):
    return H.HyperConfig.preset("toy-sd" if pipe.kind == "vp" else "toy-flux", **kw)


def sample(pipe, model, x_T):
    cond, uncond = pipe.conds(PROMPTS)
    return pipe.rollout(model, x_T, cond, uncond)["x_t"][-1]


def test_static_lora_starts_as_the_base_model_then_moves_and_raises_the_reward(tmp_path):
    pipe = tiny_pipe("vp", steps=3)
    x_T = pipe.noise(2, torch.Generator().manual_seed(1))
    sl = methods.StaticLoRA(cfg(pipe), pipe.backbone)
    base = sample(pipe, pipe.backbone, x_T)
    assert torch.equal(sample(pipe, sl.sampler_model(), x_T), base)                 # B = 0: exactly the base model
    m = train_run("static", run_cfg(tmp_path / "r", tmp_path, steps=4, lr=2e-2, lambda_reg=0.1), pipe=pipe,
                   reward=redness, prefs_reader=pref_pairs())
    assert m["method"] == "static LoRA" and m["eval"]["eval"]["change"]["reward/reward"]["mean"] > 0
    sl, saved = runs.load_trained(str(tmp_path / "r"), pipe.backbone)
    assert isinstance(sl, methods.StaticLoRA) and saved["method"] == "static" and saved["step"] == 4
    assert not any(p.requires_grad for p in pipe.backbone.model.parameters())      # the generator stays frozen
    tuned = sample(pipe, sl.sampler_model(), x_T)
    assert rel_err(tuned, base) > 1e-3
    assert redness(pipe.decode(tuned), PROMPTS).mean() > redness(pipe.decode(base), PROMPTS).mean()


def test_static_lora_gets_gradients_in_a_and_b_from_the_shared_training_step():
    pipe = tiny_pipe("vp", steps=3)
    sl = methods.StaticLoRA(cfg(pipe), pipe.backbone)
    losses.training_step(sl, pipe, redness, PROMPTS, None, 0.0, torch.Generator().manual_seed(0))
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in sl.B)         # B = 0: only B moves first
    assert all(p.grad is None for p in pipe.backbone.model.parameters())


def test_best_of_n_keeps_the_highest_reward_candidate():
    pipe = tiny_pipe("vp", steps=2)
    g = torch.Generator().manual_seed(3)
    x_T = torch.stack([pipe.noise(2, g) for _ in range(3)])                          # (N, B, C, h, w)
    images, scores, picked = testtime.best_of_n(pipe, redness, PROMPTS, x_T)
    assert scores.shape == (3, 2) and torch.equal(picked, scores.argmax(0))
    assert torch.allclose(redness(images, PROMPTS), scores.max(0).values)
    for b in range(2):                                                             # the kept image is that sample
        one = pipe.decode(sample(pipe, pipe.backbone, x_T[picked[b]]))[b]
        assert torch.allclose(images[b], one, atol=1e-6)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_guidance_raises_the_reward_over_the_base_sample_from_the_same_noise(kind):
    pipe = tiny_pipe(kind, steps=3)
    x_T = pipe.noise(2, torch.Generator().manual_seed(0))
    base = pipe.decode(sample(pipe, pipe.backbone, x_T))
    guided = pipe.decode(testtime.guidance_sample(pipe, redness, PROMPTS, x_T, rho=1.0))
    assert (redness(guided, PROMPTS) > redness(base, PROMPTS)).all()
    zero = pipe.decode(testtime.guidance_sample(pipe, redness, PROMPTS, x_T, rho=0.0))    # ρ = 0: the base sampler
    assert rel_err(zero, base) < 1e-5


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_direct_align_trains_a_static_lora(kind, tmp_path):
    pipe = tiny_pipe(kind, steps=3)
    c = run_cfg(tmp_path / "da", tmp_path, kind, steps=2, reward_mode="direct-align", reward_from=0.0,
                lambda_reg=0.0, no_eval=True)
    m = train_run("static", c, pipe=pipe, reward=redness)
    assert m["method"] == "Direct-Align"
    sl, _ = runs.load_trained(c.out, pipe.backbone)
    assert any(b.abs().sum() > 0 for b in sl.B)                                    # the LoRA moved off zero


def test_srpo_relative_reward_is_the_formula_for_any_reward_and_the_clip_fast_path():
    seen = []

    def r(images, prompts):                      # records the prompts it scores; depends on them through their length
        seen.append(list(prompts))
        return images.mean((1, 2, 3)) * torch.tensor([len(p) for p in prompts], dtype=torch.float32)

    rel = rewards.RelativeReward(r, k=1.0)
    images = torch.rand(2, 3, 4, 4)
    out = rel(images, PROMPTS)
    assert seen == [[f"Realistic photo. {p}" for p in PROMPTS], [f"Painting. {p}" for p in PROMPTS]]
    m = images.mean((1, 2, 3))
    want = 2 * m * torch.tensor([len(f"Realistic photo. {p}") for p in PROMPTS]) - \
        m * torch.tensor([len(f"Painting. {p}") for p in PROMPTS])
    assert torch.allclose(out, want)


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    for bad in (["--variant", "S"], ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            baselines.main(bad)
        assert e.value.code == 2, bad
    assert "error:" in capsys.readouterr().err


def test_the_static_lora_takes_its_own_learning_rate_per_preset_unless_given(monkeypatch):
    """baselines.py: the learning rate chosen on 'val' for the static LoRA on each toy model (config.STATIC_LR, not
    HyperAlign's), and --lr over it."""
    import config
    seen = []
    monkeypatch.setattr(baselines.runs, "train", lambda kind, cfg, resume, overwrite: seen.append(cfg))
    for argv in ([], ["--preset", "toy-flux"], ["--preset", "toy-flux", "--lr", "5e-5"]):
        baselines.main(argv)
    assert [c.lr for c in seen] == [config.STATIC_LR["toy-sd"], config.STATIC_LR["toy-flux"], 5e-5]
    assert config.RunConfig.from_preset("toy-flux").lr == 1e-3 and config.RunConfig.from_preset("toy-sd").lr == 1e-4
