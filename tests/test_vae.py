"""VAE parity with diffusers' AutoencoderKL (SD and FLUX layouts): encode, decode, posterior moments."""
import pytest
import torch
from conftest import rel_err
from diffusers import AutoencoderKL as RefVAE

import vae
import weights


TINY = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
LAYOUTS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
}


def tiny_pair(layout: str, folder):
    ref = RefVAE(**TINY, **LAYOUTS[layout]).eval()
    with torch.no_grad():  # randomise everything, incl. norms and biases, so no term can hide behind an init of 0/1
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    ref.save_pretrained(folder)  # a diffusers vae folder (SD or FLUX layout) through the strict loader
    return weights.load_vae(str(folder)), ref


@pytest.mark.parametrize("layout", ["sd", "flux"])
def test_vae_parity(layout, tmp_path):
    ours, ref = tiny_pair(layout, tmp_path / "vae")
    assert ours.config == vae.VAEConfig.from_diffusers(dict(ref.config))
    x = torch.rand(2, 3, 32, 48) * 2 - 1  # non-square, so a transposed pad or reshape would show
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        z_ref = ref.config.scaling_factor * (post.mean - (ref.config.shift_factor or 0.0))
        mean, logvar = ours.encode_moments(x)
        assert rel_err(mean, post.mean) < 1e-4 and rel_err(logvar, post.logvar) < 1e-4
        z = ours.encode(x)
        assert z.shape == (2, ref.config.latent_channels, 8, 12)
        assert rel_err(z, z_ref) < 1e-4
        img_ref = ref.decode(z_ref / ref.config.scaling_factor + (ref.config.shift_factor or 0.0)).sample
        assert rel_err(ours.decode(z_ref), img_ref) < 1e-4


def test_presets_match_layouts():
    sd, flux = vae.VAEConfig.preset("sd"), vae.VAEConfig.preset("flux")
    assert (sd.latent_channels, sd.scaling_factor, sd.shift_factor, sd.quant_conv) == (4, 0.18215, 0.0, True)
    assert (flux.latent_channels, flux.scaling_factor, flux.shift_factor, flux.quant_conv) == (16, 0.3611, 0.1159, False)
    with torch.device("meta"):
        ref = RefVAE(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                     down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        ours = vae.AutoencoderKL(sd)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_unsupported_config_raises():
    with pytest.raises(ValueError, match="unsupported"):
        vae.VAEConfig.from_diffusers(dict(down_block_types=["DownBlock2D"]))
