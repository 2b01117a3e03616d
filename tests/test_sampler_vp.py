"""VP sampler vs diffusers' DDIMScheduler configured like SD1.5: timesteps, single steps, eta noise, v-prediction."""
import pytest
import torch
from conftest import rel_err
from diffusers import DDIMScheduler
from sd_tiny import SD15_DDIM

import sampler


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 10, 50, 999])
def test_timesteps_match_ddim(spacing, steps):
    ref = DDIMScheduler(**dict(SD15_DDIM, timestep_spacing=spacing))
    ref.set_timesteps(steps)
    ours = sampler.VPSchedule.from_config(dict(SD15_DDIM, timestep_spacing=spacing))
    assert torch.equal(ours.timesteps(steps), ref.timesteps)
    assert torch.equal(ours.alpha_bar, ref.alphas_cumprod) and torch.equal(ours.final_alpha_bar, ref.final_alpha_cumprod)


def test_defaults_are_sd15_and_missing_keys_take_ddim_class_defaults():
    assert sampler.VPSchedule.from_config(None).timesteps(50)[:2].tolist() == [981, 961]
    bare = sampler.VPSchedule.from_config({})
    ref = DDIMScheduler()
    ref.set_timesteps(20)
    assert torch.equal(bare.timesteps(20), ref.timesteps) and torch.equal(bare.alpha_bar, ref.alphas_cumprod)
    with pytest.raises(ValueError, match="steps"):
        sampler.VPSchedule.from_config(None).timesteps(0)
    with pytest.raises(ValueError, match="beta_schedule"):
        sampler.VPSchedule.from_config(dict(beta_schedule="sigmoid"))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_steps_match(prediction_type, eta):
    config = dict(SD15_DDIM, prediction_type=prediction_type)
    ref = DDIMScheduler(**config)
    ref.set_timesteps(25)
    ours = sampler.VPSchedule.from_config(config)
    x_t = torch.randn(2, 4, 8, 8)
    for t in ref.timesteps.tolist()[::6] + [ref.timesteps[-1].item()]:  # includes the last step (t_prev < 0)
        pred = torch.randn_like(x_t)
        out = ref.step(pred, t, x_t, eta=eta, generator=torch.Generator().manual_seed(3))
        x_prev, x0_hat = sampler.ddim_step(x_t, pred, t, t - 1000 // 25, ours, eta, torch.Generator().manual_seed(3))
        assert rel_err(x_prev, out.prev_sample) < 1e-6 and rel_err(x0_hat, out.pred_original_sample) < 1e-6


def test_sample_loop_guidance_and_trajectory():
    """The whole loop against the scheduler driven by hand, with CFG on a toy model whose output depends on cond."""
    ref = DDIMScheduler(**SD15_DDIM)
    ref.set_timesteps(8)
    calls = []

    def model(x_t, t, cond):
        calls.append((x_t.shape[0], t.shape, cond.shape[0]))
        return 0.5 * x_t * torch.tanh(cond.mean()) + 0.01 * t.float()[:, None, None, None] / 1000 * cond[:, :1, None]

    cond, uncond = torch.randn(1, 3, 1), torch.randn(1, 3, 1)
    x_T = torch.randn(1, 3, 4, 4)
    x_ref = x_T
    for t in ref.timesteps:
        p_u, p_c = model(torch.cat([x_ref] * 2), t.expand(2), torch.cat([uncond, cond])).chunk(2)
        x_ref = ref.step(p_u + 7.5 * (p_c - p_u), t, x_ref).prev_sample
    calls.clear()
    x0, traj = sampler.ddim_sample(model, x_T, cond, sampler.VPSchedule.from_config(SD15_DDIM), steps=8,
                                   uncond=uncond, guidance=7.5, trajectory=True)
    assert rel_err(x0, x_ref) < 1e-6
    assert calls == [(2, (2,), 2)] * 8  # one batched call per step: [uncond; cond]
    assert traj["x_t"].shape == (9, 1, 3, 4, 4) and traj["x0_hat"].shape == (8, 1, 3, 4, 4)
    assert torch.equal(traj["x_t"][0], x_T) and torch.equal(traj["x_t"][-1], x0)
    assert traj["t"].tolist() == ref.timesteps.tolist()


def test_noise_and_target_invert_x0_hat():
    s = sampler.VPSchedule.from_config(None)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    a = s.alpha_bar[torch.tensor([10, 900])].view(2, 1, 1, 1)
    x_t = sampler.add_noise(x0, eps, a)
    for kind in ("epsilon", "v_prediction", "sample"):
        x0_hat, eps_hat = sampler.predict_x0(x_t, sampler.training_target(x0, eps, a, kind), a, kind)
        assert rel_err(x0_hat, x0) < 1e-4 and rel_err(eps_hat, eps) < 1e-4
