"""weights_flux.py: BFL single files, diffusers folders; text encoders; clear errors on bad input."""
import json

import pytest
import torch
from conftest import rel_err
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file
from test_flux import diffusers_v, flux_inputs, tiny_diffusers_flux

import pipeline
import weights
import weights_flux
from flux import Flux, FluxConfig
from weights import WeightsError


def _cheap_random(shape: tuple[int, ...], period: int = 999_983) -> torch.Tensor:
    """Random-looking bf16 values without drawing 500M normals: a prime-period random pattern at a random offset."""
    n = 1
    for s in shape:
        n *= s
    pattern = 0.05 * torch.randn(period, dtype=torch.bfloat16)
    off = int(torch.randint(0, period, ()))
    return pattern.repeat((n + off) // period + 1)[off:off + n].view(shape)


def test_bfl_single_file_rules_invert_diffusers_converter(tmp_path):
    """Full width (diffusers' converter hard-codes 3072), 1 double + 1 single block: our diffusers -> BFL rules are
    the exact inverse of diffusers' BFL -> diffusers converter; the BFL file (bf16, as published) then loads and gives
    diffusers' v in fp32."""
    with torch.device("meta"):  # 24 heads x 128 = 3072 by default
        ref = FluxTransformer2DModel(in_channels=16, joint_attention_dim=24, pooled_projection_dim=20, num_layers=1,
                                     num_single_layers=1, guidance_embeds=True)
    sd = {k: _cheap_random(tuple(v.shape)) for k, v in ref.state_dict().items()}
    bfl = weights_flux.flux_diffusers_to_bfl(sd)
    assert "final_layer.adaLN_modulation.1.weight" in bfl and "single_blocks.0.linear1.weight" in bfl
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl, str(path))
    del bfl, back
    ref.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    del sd
    args = flux_inputs(ref.eval(), h=4, w=4, L_txt=3)
    with torch.no_grad():
        v_ref = diffusers_v(ref, *args)
    del ref
    ours = weights_flux.load_flux(str(path))  # fp32
    assert (ours.config.hidden_size, ours.config.num_heads, ours.config.depth, ours.config.depth_single_blocks,
            ours.config.guidance_embed, ours.config.in_channels) == (3072, 24, 1, 1, True, 16)
    with torch.no_grad():
        err = rel_err(ours(*args), v_ref)
    print(f"BFL single file, width 3072: rel err {err:.2e}")
    assert err < 1e-4


def test_tiny_bfl_file_with_prefix_and_axes_dim(tmp_path):
    """A ComfyUI-style prefixed BFL file of a non-FLUX.1 head dim loads with axes_dim given, and only then."""
    model = Flux(FluxConfig.preset("flux-tiny-schnell"))
    path = str(tmp_path / "tiny.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}, path)
    with pytest.raises(WeightsError, match="head dim 16 .* pass axes_dim"):
        weights_flux.load_flux(path)
    loaded = weights_flux.load_flux(path, axes_dim=(4, 6, 6), dtype=torch.bfloat16)
    assert loaded.config == FluxConfig.preset("flux-tiny-schnell")
    assert loaded.img_in.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.img_in.weight, model.img_in.weight.bfloat16())


def test_text_encoders_chosen_by_model_type(tmp_path):
    """text_encoder_2/ may be a real T5 or (toy folders) a CLIPTextModel: the class follows config.json."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    t5 = T5EncoderModel(T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=20)).eval()
    ids = torch.randint(0, 50, (2, 7))
    for name, model in (("t5", t5), ("clip", clip)):
        model.save_pretrained(tmp_path / name)
        loaded = weights.load_text_encoder(str(tmp_path / name))
        assert type(loaded) is type(model)
        with torch.no_grad():
            assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
    sd = weights.read_safetensors(str(tmp_path / "clip" / "model.safetensors"))
    sd.pop(next(k for k in sd if k.endswith("final_layer_norm.weight")))
    save_file(sd, str(tmp_path / "clip" / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"missing 1 \(\S*final_layer_norm.weight\)"):
        weights.load_text_encoder(str(tmp_path / "clip"))
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(WeightsError, match="model_type 'bert'"):
        weights.load_text_encoder(str(tmp_path / "t5"))


# ------------------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def tiny_folder(tmp_path):
    tiny_diffusers_flux(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)).save_pretrained(
        tmp_path / "transformer")
    return tmp_path / "transformer"


def _rewrite(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    sd = weights.read_safetensors(str(path))
    edit(sd)
    save_file(sd, str(path))


def test_bad_paths_and_files(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder"):
        weights_flux.load_flux(str(tmp_path / "nope.safetensors"))
    (tmp_path / "flux.ckpt").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="only .safetensors"):
        weights_flux.load_flux(str(tmp_path / "flux.ckpt"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        weights_flux.load_flux(str(tmp_path / "broken.safetensors"))
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(WeightsError, match="not a FLUX .* 'img_in.weight' is missing"):
        weights_flux.load_flux(str(tmp_path / "unet.safetensors"))
    with pytest.raises(WeightsError, match="no such file or folder"):
        pipeline.load(str(tmp_path / "nowhere"))
    with pytest.raises(WeightsError, match="not a diffusers pipeline folder"):
        pipeline.load(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(WeightsError, match="not a diffusers FLUX folder: no transformer/"):
        pipeline.load(str(tmp_path))


def test_missing_unexpected_misshaped_keys(tiny_folder):
    _rewrite(tiny_folder, lambda sd: (sd.pop("proj_out.bias"), sd.update(extra=torch.zeros(1)),
                                      sd.update({"x_embedder.weight": torch.zeros(32, 5)})))
    with pytest.raises(WeightsError) as e:
        weights_flux.load_flux(str(tiny_folder))
    msg = str(e.value)
    assert "missing 1 (final_layer.linear.bias)" in msg and "unexpected 1 (extra)" in msg
    assert "img_in.weight: file (32, 5) vs model (32, 8)" in msg


def test_incomplete_fused_parts_and_bad_config(tiny_folder):
    _rewrite(tiny_folder, lambda sd: sd.pop("single_transformer_blocks.1.proj_mlp.weight"))
    with pytest.raises(WeightsError, match=r"single_blocks.1.linear1.weight needs parts \['q', 'k', 'v', 'mlp'\]"):
        weights_flux.load_flux(str(tiny_folder))
    config = json.loads((tiny_folder / "config.json").read_text())
    (tiny_folder / "config.json").write_text(json.dumps({**config, "axes_dims_rope": [4, 4, 4]}))
    with pytest.raises(WeightsError, match=r"axes_dim \(4, 4, 4\) must be even and sum to the head dim 16"):
        weights_flux.load_flux(str(tiny_folder))
    (tiny_folder / "config.json").write_text(json.dumps({**config, "patch_size": 2}))
    with pytest.raises(WeightsError, match="patch_size 2"):
        weights_flux.load_flux(str(tiny_folder))
    (tiny_folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="no config.json"):
        weights_flux.load_flux(str(tiny_folder))
