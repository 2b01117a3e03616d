"""sampler.py rectified-flow section against diffusers' FlowMatchEulerDiscreteScheduler and FluxPipeline helpers."""
import numpy as np
import pytest
import torch
from conftest import rel_err
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from sampler import flow_sample, flow_timesteps, flow_x0_hat, flux_mu, image_ids, pack, unpack

# scheduler/scheduler_config.json of FLUX.1-dev and FLUX.1-schnell
DEV = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
           shift=3.0, use_dynamic_shifting=True)
SCHNELL = dict(DEV, shift=1.0, use_dynamic_shifting=False)


def diffusers_sigmas(config: dict, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """What FluxPipeline hands its scheduler: sigmas = linspace(1, 1/N, N), mu from the image-token count."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=calculate_shift(image_seq_len))
    return scheduler.sigmas


@pytest.mark.parametrize("num_steps, image_seq_len", [(1, 16), (4, 64), (28, 1024), (50, 4096), (20, 6000)])
def test_schedule_matches_flow_match_euler(num_steps, image_seq_len):
    assert flux_mu(image_seq_len) == pytest.approx(calculate_shift(image_seq_len), abs=1e-12)
    ours = flow_timesteps(num_steps, image_seq_len, shift=True)
    ref = diffusers_sigmas(DEV, num_steps, image_seq_len)
    assert ours.shape == (num_steps + 1,) and ours[0] == 1 and ours[-1] == 0
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert torch.allclose(flow_timesteps(num_steps, image_seq_len, shift=False),
                          diffusers_sigmas(SCHNELL, num_steps, image_seq_len), atol=1e-6, rtol=0)


def test_pack_unpack_and_ids_match_flux_pipeline():
    B, C, H, W = 2, 16, 6, 10
    z = torch.randn(B, C, H, W)
    x = pack(z)
    assert torch.equal(x, FluxPipeline._pack_latents(z, B, C, H, W))
    # _unpack_latents takes the pixel size and the VAE factor (8): pixels = latents * 8
    assert torch.equal(unpack(x, H, W), FluxPipeline._unpack_latents(x, H * 8, W * 8, 8))
    assert torch.equal(unpack(x, H, W), z)
    ref_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, "cpu", torch.float32)
    assert torch.equal(image_ids(B, H, W), ref_ids[None].expand(B, -1, -1))
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(1, 4, 5, 6))


def test_euler_sampling_matches_scheduler_steps():
    """flow_sample is FlowMatchEulerDiscreteScheduler.step in a loop, for any velocity field."""
    def model(x, t, cond):  # a nonlinear stand-in for the transformer
        return torch.tanh(x * cond["w"]) + t[:, None, None] * x

    cond = dict(w=torch.randn(4))
    x_T = torch.randn(2, 6, 4)
    ts = flow_timesteps(8, 6)
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=calculate_shift(6))
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, (t / 1000).expand(2), cond), t, x).prev_sample
    ours, traj = flow_sample(model, x_T, cond, steps=8, trajectory=True)
    assert rel_err(ours, x) < 1e-5
    assert torch.equal(traj["t"], ts[:-1])
    assert traj["x_t"].shape == (9, 2, 6, 4) and traj["x0_hat"].shape == (8, 2, 6, 4)
    assert torch.equal(traj["x_t"][0], x_T) and torch.equal(traj["x_t"][-1], ours)
    assert torch.equal(flow_sample(model, x_T, cond, ts=ts), ours)


def test_one_step_prediction_is_exact_on_a_straight_path():
    """x_t = (1 - t) x0 + t eps with the true velocity v = eps - x0 gives x0_hat = x0 at every t."""
    x0, eps = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    for t in (1.0, 0.7, 0.2):
        x_t = (1 - t) * x0 + t * eps
        assert torch.allclose(flow_x0_hat(x_t, t, eps - x0), x0, atol=1e-6)
    # and Euler integration of the true (constant) velocity lands on x0 in one step
    assert torch.allclose(flow_sample(lambda x, t, c: eps - x0, eps, {}, steps=1, shift=False), x0, atol=1e-6)
