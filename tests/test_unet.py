"""U-Net parity with diffusers' UNet2DConditionModel: tiny configs from save_pretrained folders, full SD1.5 config."""
import math

import pytest
import torch
from conftest import rel_err
from diffusers import UNet2DConditionModel

import unet as unet_mod
import weights


TINY = {
    # two levels, one layer per block, conv projections, per-level head counts
    "a": dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
              cross_attention_dim=24, sample_size=16),
    # three levels, two layers per block, linear projections, two transformer layers, heads given as num_attention_heads
    "b": dict(block_out_channels=(16, 32, 48), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(1, 2, 4),
              transformer_layers_per_block=2, use_linear_projection=True, norm_num_groups=4, cross_attention_dim=16,
              in_channels=4, out_channels=4, sample_size=16),
}


def randomise(model: torch.nn.Module, std: float = 0.1):
    """Every parameter random (norms and biases too), so no term can hide behind an init of 0 or 1."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * std)
    return model


def saved_tiny(tmp_path, name):
    ref = randomise(UNet2DConditionModel(**TINY[name]).eval())
    ref.save_pretrained(tmp_path / name)
    return ref, tmp_path / name


@pytest.mark.parametrize("name", sorted(TINY))
def test_unet_parity_tiny(tmp_path, name):
    ref, folder = saved_tiny(tmp_path, name)
    ours = weights.load_unet(str(folder))
    x = torch.randn(2, 4, 16, 24)
    context = torch.randn(2, 7, TINY[name]["cross_attention_dim"])
    for t in (torch.tensor([3, 801]), torch.tensor(500), 999):
        with torch.no_grad():
            out_ref = ref(x, t, encoder_hidden_states=context).sample
            out = ours(x, t, context)
        assert rel_err(out, out_ref) < 1e-4, (name, t)
    # odd latent sizes need the upsampler to follow the skip's size
    x = torch.randn(1, 4, 13, 11)
    with torch.no_grad():
        assert rel_err(ours(x, 10, context[:1]), ref(x, 10, encoder_hidden_states=context[:1]).sample) < 1e-4


def test_down_is_first_half_and_checkpointing_matches(tmp_path):
    ref, folder = saved_tiny(tmp_path, "b")
    ours = weights.load_unet(str(folder))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 16)
    h, skips, emb = ours.down(x, torch.tensor([5, 6]), context)
    assert len(skips) == 1 + 3 * 2 + 2 and h.shape == (2, 48, 4, 4) and emb.shape == (2, 64)
    # gradient checkpointing changes memory, not numbers or gradients
    ours.train().requires_grad_(True)
    grads = []
    for ckpt in (False, True):
        ours.gradient_checkpointing = ckpt
        ours.zero_grad()
        out = ours(x, torch.tensor([5, 6]), context)
        out.square().mean().backward()
        grads.append((out.detach(), ours.conv_in.weight.grad.clone()))
    assert rel_err(grads[1][0], grads[0][0]) < 1e-6 and rel_err(grads[1][1], grads[0][1]) < 1e-6


def test_attention_projections_are_named_linears():
    ours = unet_mod.make_unet("toy-sd")
    names = [n for n, m in ours.named_modules() if isinstance(m, torch.nn.Linear) and ".attn" in n]
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in names
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0" in names


def sd15_config():
    return dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                cross_attention_dim=768, sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


def test_sd15_keys_and_shapes_equal_diffusers():
    with torch.device("meta"):
        ref = UNet2DConditionModel(**sd15_config())
        ours = unet_mod.make_unet("sd15")
    assert unet_mod.UNetConfig.from_diffusers(dict(ref.config)) == unet_mod.UNetConfig.preset("sd15")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@pytest.mark.slow
def test_sd15_full_size_numeric():
    """Full SD1.5 size, random weights shared by both models (assigned, one copy), 16x16 latents."""
    with torch.device("meta"):
        ref = UNet2DConditionModel(**sd15_config())
        ours = unet_mod.make_unet("sd15")
    # NOTE: 860M fresh normals take ~20 s and 3.4 GB; views into one 128 MB pool per power-of-2 weight scale (~1/sqrt
    # fan-in), at varied offsets, are random enough for a parity check and keep time and memory small
    base, pools, sd = torch.randn(2 ** 25, generator=torch.Generator().manual_seed(0)), {}, {}
    for i, (k, v) in enumerate(ref.state_dict().items()):
        scale = 0.5 if v.ndim == 1 else 2.0 ** round(math.log2(v[0].numel() ** -0.5))
        if scale not in pools:
            pools[scale] = base * scale
        pool = pools[scale]
        offset = (i * 7919 * 131) % (pool.numel() - v.numel() + 1)
        sd[k] = pool[offset:offset + v.numel()].view(v.shape)
    ref.load_state_dict(sd, assign=True)
    ours.load_state_dict(sd, assign=True)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 768)
    with torch.no_grad():
        out_ref = ref.eval()(x, torch.tensor([637]), encoder_hidden_states=context).sample
        out = ours.eval()(x, torch.tensor([637]), context)
    assert out.abs().mean() > 1e-3 and rel_err(out, out_ref) < 1e-4


def test_unsupported_config_raises():
    with pytest.raises(ValueError, match="unsupported"):
        unet_mod.UNetConfig.from_diffusers(dict(addition_embed_type="text_time"))


def test_sharded_folder_and_pipeline_folder(tmp_path):
    ref = randomise(UNet2DConditionModel(**TINY["a"]).eval())
    ref.save_pretrained(tmp_path / "pipe" / "unet", max_shard_size="100KB")
    assert any(p.name.endswith(".index.json") for p in (tmp_path / "pipe" / "unet").iterdir())
    ours = weights.load_unet(str(tmp_path / "pipe"))  # a pipeline folder: its unet/
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 24)
    with torch.no_grad():
        assert rel_err(ours(x, 20, context), ref(x, 20, encoder_hidden_states=context).sample) < 1e-4
