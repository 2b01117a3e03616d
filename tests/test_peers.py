"""The paper's baselines (finetune.py, testtime.py) on hand-computed cases: the DPO and KTO losses against their
formulas, GRPO's Gaussian log-probability, advantages and first inner step, and the model calls ε-greedy and FreeDoM
spend."""
import math

import pytest
import torch
from tiny import PROMPTS, pref_pairs, redness, tiny_pipe, train_run

import finetune
import hyperalign as H
import methods
import prefs
import testtime
from conftest import rel_err


def static(pipe, seed=0):
    torch.manual_seed(seed)
    sl = methods.StaticLoRA(H.HyperConfig.preset("toy-sd" if pipe.kind == "vp" else "toy-flux"), pipe.backbone)
    with torch.no_grad():
        for b in sl.B:
            b.normal_(0, 0.05)                                       # a LoRA that does something
    return sl


def test_dpo_loss_is_the_two_sample_formula():
    err_w, err_l, ref_w, ref_l = (torch.tensor([v]) for v in (1.0, 2.0, 1.5, 1.5))
    # inside = -β/2 ((1 - 2) - (1.5 - 1.5)) = β/2: the model fits the winner better than the loser, the loss is small
    assert torch.allclose(finetune.dpo_loss(err_w, err_l, ref_w, ref_l, 2.0), -torch.log(torch.sigmoid(torch.tensor(1.0))))
    # the other way round it is larger; equal errors give log 2
    assert finetune.dpo_loss(err_l, err_w, ref_w, ref_l, 2.0) > finetune.dpo_loss(err_w, err_l, ref_w, ref_l, 2.0)
    assert torch.allclose(finetune.dpo_loss(ref_w, ref_l, ref_w, ref_l, 5000.0), torch.tensor([math.log(2)]))


def test_kto_loss_by_hand():
    err, ref = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.5])
    desirable = torch.tensor([True, False])
    # g = ref - err = (0.5, -0.5); z = max(0, mean g) = 0; h = σ(+0.5), σ(-1 · -0.5) = σ(0.5); loss = 1 - h
    expected = 1 - torch.sigmoid(torch.tensor([0.5, 0.5]))
    assert torch.allclose(finetune.kto_loss(err, ref, desirable, 1.0), expected)
    # a reference point above 0: z = mean g = 0.5 when both images improve by (1, 0)
    loss = finetune.kto_loss(torch.tensor([0.5, 1.5]), ref, desirable, 1.0)
    assert torch.allclose(loss, 1 - torch.sigmoid(torch.tensor([0.5, 0.5])))


def test_group_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0])
    a = finetune.group_advantages(r, 3)
    for g in a.view(2, 3):
        assert abs(g.mean().item()) < 1e-6 and abs(g.std(unbiased=False).item() - 1) < 1e-3
    assert finetune.group_advantages(torch.tensor([1.0, 1.0]), 2).abs().max() == 0      # a tie: no signal
    assert finetune.group_advantages(torch.tensor([0.0, 0.0, 0.0, 1e6]), 4, clip=1.0).abs().max() <= 1.0


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_the_stochastic_step_is_a_gaussian_with_its_log_probability(kind):
    pipe = tiny_pipe(kind, steps=4)
    bb, (t, t_next) = pipe.backbone, pipe.pairs()[1]
    x = pipe.noise(3, torch.Generator().manual_seed(0))
    pred = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    tb, tn = pipe.t_batch(t, 3), pipe.t_batch(t_next, 3)
    x_next, lp, mean, std = bb.step_logprob(x, pred, tb, tn, 0.7, torch.Generator().manual_seed(2),
                                            t_cap=pipe.pairs()[0][1])
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x_next).flatten(1).mean(1)
    assert rel_err(lp, ref) < 1e-6
    again = bb.step_logprob(x, pred, tb, tn, 0.7, x_next=x_next, t_cap=pipe.pairs()[0][1])[1]   # GRPO's re-scoring
    assert torch.equal(again, lp)
    if kind == "vp":                                   # η → 0: DDIM's deterministic step
        det = bb.step_logprob(x, pred, tb, tn, 1e-8, torch.Generator().manual_seed(2))[0]
        assert rel_err(det, pipe.step(x, pred, t, t_next)[0]) < 1e-5


def test_grpo_first_inner_step_has_ratio_one_and_clips_nothing():
    """The trajectories are sampled with the LoRA being trained: before any update the new log-probabilities equal
    the old ones (ratio 1), so PPO's clip cannot bite, and gradients reach the LoRA only."""
    pipe = tiny_pipe("vp", steps=3)
    sl = static(pipe)
    log = finetune.grpo_step(sl, pipe, redness, PROMPTS[:2], torch.Generator().manual_seed(0), group=3, eta=1.0,
                             clip=1e-4, kl=0.01, fraction=1.0)
    assert log["ratio_dev"] < 1e-5 and log["clipped"] == 0.0 and math.isfinite(log["loss"]) and log["kl"] >= 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sl.B)
    assert all(p.grad is None for p in pipe.backbone.model.parameters())
    lp_old, adv = torch.randn(6), torch.randn(6)
    loss, clipped = finetune.ppo_loss(lp_old.clone(), lp_old, adv, 1e-4)
    assert clipped == 0 and torch.allclose(loss, -adv)                    # ratio 1: the loss is −A
    loss, clipped = finetune.ppo_loss(lp_old + 0.1, lp_old, adv, 1e-4)    # a moved policy is clipped
    assert clipped == 1 and torch.allclose(loss, torch.maximum(-adv * math.exp(0.1), -adv * (1 + 1e-4)))


@pytest.mark.parametrize("which", ["dpo", "kto"])
def test_preference_losses_train_the_lora_only(which):
    pipe = tiny_pipe("vp", steps=3)
    sl = static(pipe)
    batch = next(prefs.stream(pref_pairs(), 2, 16, rejected=True))
    step = {"dpo": lambda: finetune.dpo_step(sl, pipe, batch, 5000.0, torch.Generator().manual_seed(0)),
            "kto": lambda: finetune.kto_step(sl, pipe, batch, 1000.0, torch.Generator().manual_seed(0))}[which]
    log = step()
    assert math.isfinite(log["loss"])
    assert all(p.grad is not None for p in sl.B) and all(p.grad is None for p in pipe.backbone.model.parameters())


def test_epsilon_greedy_spends_n_times_k_extra_calls_per_step():
    pipe = tiny_pipe("vp", steps=3)
    calls = []
    x = testtime.epsilon_greedy(pipe, redness, PROMPTS[:2], pipe.noise(2, torch.Generator().manual_seed(0)), n=2,
                                k=3, generator=torch.Generator().manual_seed(1), calls=calls)
    assert len(calls) == 3 * (1 + 2 * 3) and torch.isfinite(x).all()      # per step: the step's own + N·K


def test_freedom_guides_in_its_window_and_travels_back_in_time():
    """10 steps, index 9 .. 0: guidance for 3 <= index < 7, three passes for 4 <= index < 7 (the reference's 100-step
    window, scaled): 10 + 3 x 2 = 16 model calls; ρ = 0 outside the window leaves those steps DDPM's."""
    pipe = tiny_pipe("vp", steps=10, guidance=3.0)
    calls = []
    x = testtime.freedom(pipe, redness, PROMPTS[:2], pipe.noise(2, torch.Generator().manual_seed(0)),
                         generator=torch.Generator().manual_seed(1), calls=calls)
    assert len(calls) == 16 and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="classifier-free guidance"):
        testtime.freedom(tiny_pipe("vp", steps=4, guidance=1.0), redness, PROMPTS[:1],
                         pipe.noise(1, torch.Generator()))


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_baselines_train_each_objective_as_a_run(objective, tmp_path):
    """baselines.py --objective X: a run folder, checkpoints and resume like the static LoRA's (tiny pipeline)."""
    import rundir
    from tiny import run_cfg
    cfg = run_cfg(tmp_path / objective, tmp_path, objective=objective, lambda_reg=0.0, steps=2, no_eval=True,
                  grpo_group=2, batch_size=2)
    train_run("static", cfg, pipe=tiny_pipe("vp", steps=2), reward=redness, prefs_reader=pref_pairs())
    assert rundir.load(cfg.out)[2] == 2
    assert rundir.read_config(cfg.out)["run"]["objective"] == objective
