"""flux.py against diffusers' FluxTransformer2DModel: same numbers, same keys and shapes."""
import pytest
import torch
from conftest import rel_err
from diffusers import FluxTransformer2DModel

import weights_flux
from flux import Flux, FluxConfig
from sampler import image_ids

# two tiny configurations: with / without guidance embedding, different head counts, head dims and RoPE axes
TINY = {
    "guidance-2heads": dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                            guidance_embeds=True),
    "schnell-3heads": dict(num_attention_heads=3, attention_head_dim=8, axes_dims_rope=(2, 2, 4),
                           guidance_embeds=False),
}


def tiny_diffusers_flux(in_channels=8, joint_attention_dim=12, pooled_projection_dim=10, num_layers=2,
                        num_single_layers=2, **kw) -> FluxTransformer2DModel:
    """A tiny diffusers FLUX with non-trivial weights (default init leaves gates and norms near identity)."""
    model = FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=num_layers,
                                   num_single_layers=num_single_layers, joint_attention_dim=joint_attention_dim,
                                   pooled_projection_dim=pooled_projection_dim, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def flux_inputs(model: FluxTransformer2DModel, B=2, h=8, w=12, L_txt=5):
    """Random inputs for a (h, w) latent: ours as (B, L, 3) ids, diffusers as (L, 3)."""
    c = model.config
    img = torch.randn(B, (h // 2) * (w // 2), c.in_channels)
    txt, y = torch.randn(B, L_txt, c.joint_attention_dim), torch.randn(B, c.pooled_projection_dim)
    img_ids, txt_ids = image_ids(B, h, w), torch.zeros(B, L_txt, 3)
    t = torch.tensor([0.3, 0.9])[:B]
    g = torch.tensor([3.5, 2.0])[:B] if c.guidance_embeds else None
    return img, img_ids, txt, txt_ids, t, y, g


def diffusers_v(model, img, img_ids, txt, txt_ids, t, y, g):
    return model(img, txt, y, t, img_ids[0], txt_ids[0], guidance=g).sample


@pytest.mark.parametrize("name", list(TINY))
def test_parity_with_diffusers_folder(name, tmp_path):
    ref = tiny_diffusers_flux(**TINY[name])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded, with an index file, as published
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = weights_flux.load_flux(str(tmp_path))
    assert ours.config.guidance_embed == ref.config.guidance_embeds
    args = flux_inputs(ref)
    with torch.no_grad():
        err = rel_err(ours(*args), diffusers_v(ref, *args))
    print(f"{name}: rel err {err:.2e}")
    assert err < 1e-4


def test_guidance_is_required_for_dev_and_ignored_by_schnell(tmp_path):
    cfg = FluxConfig.preset("flux-tiny")
    img = torch.randn(1, 6, 16)
    args = (img, image_ids(1, 4, 6), torch.randn(1, 3, 32), torch.zeros(1, 3, 3), torch.tensor([0.5]),
            torch.randn(1, 32))
    with pytest.raises(ValueError, match="guidance"):
        Flux(cfg)(*args)
    schnell = Flux(FluxConfig.preset("flux-tiny-schnell")).eval()
    with torch.no_grad():
        assert torch.equal(schnell(*args), schnell(*args, torch.tensor([3.5])))
    with pytest.raises(ValueError, match=r"packed latents \(B, L, 16\)"):
        schnell(torch.randn(1, 6, 8), *args[1:])


def test_features_and_gradient_checkpointing():
    """forward = features (embedders + double blocks) + single blocks; checkpointing changes no number."""
    model = Flux(FluxConfig.preset("flux-tiny"))
    args = (torch.randn(2, 6, 16), image_ids(2, 4, 6), torch.randn(2, 3, 32), torch.zeros(2, 3, 3),
            torch.tensor([0.2, 0.7]), torch.randn(2, 32), torch.tensor([3.5, 3.5]))
    img, txt, vec, pe = model.forward_features(*args, depth=1)
    assert img.shape == (2, 6, 32) and txt.shape == (2, 3, 32) and vec.shape == (2, 32)
    model(*args).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(*args).square().sum().backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.parametrize("preset", ["flux-dev", "flux-schnell"])
def test_full_config_keys_and_shapes_match_diffusers(preset):
    """The published configurations, on meta: our state dict == diffusers' converted by the rules, key and shape."""
    with torch.device("meta"):
        ref = FluxTransformer2DModel(guidance_embeds=preset == "flux-dev")
        config = weights_flux.flux_config_from_diffusers(dict(ref.config))
        ours = Flux(config)
    assert config == FluxConfig.preset(preset)
    converted = {k: tuple(v.shape) for k, v in weights_flux.flux_diffusers_to_bfl(ref.state_dict()).items()}
    assert converted == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert FluxConfig.from_bfl_keys(ours.state_dict()) == config
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    print(f"{preset}: {len(converted)} tensors, {n / 1e9:.2f} B parameters")


def test_bf16_matches_diffusers_in_bf16(tmp_path):
    """dtype=bfloat16 (real use): close to diffusers run in bf16 too. Not to fp32: both round t to bf16 before the
    x1000 of the time embedding, as BFL does, which moves the sinusoid by up to ~1 rad."""
    ref = tiny_diffusers_flux(**TINY["guidance-2heads"])
    ref.save_pretrained(tmp_path)
    ours = weights_flux.load_flux(str(tmp_path), dtype=torch.bfloat16)
    assert ours.img_in.weight.dtype == torch.bfloat16
    img, img_ids, txt, txt_ids, t, y, g = flux_inputs(ref)
    args = (img.bfloat16(), img_ids, txt.bfloat16(), txt_ids, t.bfloat16(), y.bfloat16(), g.bfloat16())
    with torch.no_grad():
        v = ours(*args)
        v_ref = diffusers_v(ref.to(torch.bfloat16), *args)
    assert v.dtype == torch.bfloat16
    err = rel_err(v, v_ref)
    print(f"bf16: rel err {err:.2e}")
    assert err < 2e-2
