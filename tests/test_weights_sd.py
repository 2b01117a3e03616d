"""SD1.5 loaders: LDM single-file rules against diffusers' own converters, VAE layouts, text encoder, bad input."""
import re

import pytest
import torch
from conftest import rel_err
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from sd_tiny import TEXT, UNET, VAE, randomise, tiny_parts, write_tokenizer

import unet as unet_mod
import pipeline
import weights
from weights import WeightsError


# ---- diffusers -> LDM, written independently of weights.py's LDM -> diffusers rules; diffusers' converters judge both


def diffusers_unet_to_ldm(sd: dict, L: int, cross_up: list[bool]) -> dict:
    def key(k):
        k = re.sub(r"^time_embedding\.linear_1\.", "time_embed.0.", k)
        k = re.sub(r"^time_embedding\.linear_2\.", "time_embed.2.", k)
        k = re.sub(r"^conv_in\.", "input_blocks.0.0.", k)
        k = re.sub(r"^conv_norm_out\.", "out.0.", k)
        k = re.sub(r"^conv_out\.", "out.2.", k)
        k = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m[1]) + 1) * (L + 1)}.0.op.", k)
        k = re.sub(r"^down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
                   lambda m: f"input_blocks.{1 + int(m[1]) * (L + 1) + int(m[3])}.{int(m[2] == 'attentions')}.", k)
        k = re.sub(r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}.", k)
        k = re.sub(r"^mid_block\.attentions\.0\.", "middle_block.1.", k)
        k = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"output_blocks.{int(m[1]) * (L + 1) + L}.{1 + cross_up[int(m[1])]}.", k)
        k = re.sub(r"^up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.",
                   lambda m: f"output_blocks.{int(m[1]) * (L + 1) + int(m[3])}.{int(m[2] == 'attentions')}.", k)
        for a, b in [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                     ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]:
            k = re.sub(rf"^((?:input|output)_blocks\.\d+\.0|middle_block\.[02])\.{a}\.", rf"\1.{b}.", k)
        return "model.diffusion_model." + k
    return {key(k): v for k, v in sd.items()}


def diffusers_vae_to_ldm(sd: dict, n: int, old_spelling: bool = False) -> dict:
    q, k_, v_, o, norm = ("query", "key", "value", "proj_attn", "group_norm") if old_spelling else \
        ("q", "k", "v", "proj_out", "norm")

    def key(k):
        k = re.sub(r"conv_norm_out\.", "norm_out.", k)
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.block.\2.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"up.{n - 1 - int(m[1])}.block.{m[2]}.", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n - 1 - int(m[1])}.upsample.", k)
        k = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = re.sub(r"mid_block\.attentions\.0\.", "mid.attn_1.", k)
        k = k.replace("conv_shortcut", "nin_shortcut")
        for a, b in [("group_norm", norm), ("to_q", q), ("to_k", k_), ("to_v", v_), ("to_out.0", o)]:
            k = k.replace(f"attn_1.{a}.", f"attn_1.{b}.")
        return k
    # LDM attention projections are 1x1 convs
    return {key(k): (v[:, :, None, None] if re.search(r"attentions\.0\.to_(q|k|v|out\.0)\.weight", k) else v)
            for k, v in sd.items()}


def test_ldm_unet_rules_invert_diffusers_converter_and_load(tmp_path):
    cfg = dict(UNET, layers_per_block=2)
    ref = randomise(UNet2DConditionModel(**cfg)).eval()
    ref_sd = ref.state_dict()
    ldm = diffusers_unet_to_ldm(ref_sd, 2, [t.startswith("CrossAttn") for t in cfg["up_block_types"]])
    converted = convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    assert set(converted) == set(ref_sd) and all(converted[k] is ref_sd[k] for k in ref_sd)  # LDM dict is right
    ours = weights.rename(weights.strip_prefix(ldm, "model.diffusion_model."), weights.ldm_unet_rules(2))
    assert set(ours) == set(ref_sd) and all(ours[k] is ref_sd[k] for k in ref_sd)  # our rules invert it
    # the file, in fp16 as most SD1.5 downloads, with unrelated keys around it, loads into the right model
    file = tmp_path / "sd15-tiny.safetensors"
    save_file({**{k: v.half() for k, v in ldm.items()}, "model_ema.decay": torch.tensor(0.9999)}, str(file))
    model = weights.load_unet(str(file), config=unet_mod.UNetConfig.from_diffusers(dict(ref.config)))
    ref.load_state_dict({k: v.half().float() for k, v in ref_sd.items()})
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 64)
    with torch.no_grad():
        assert rel_err(model(x, 400, ctx), ref(x, 400, encoder_hidden_states=ctx).sample) < 1e-4


@pytest.mark.parametrize("layout", ["sd", "flux"])
def test_ldm_vae_rules_invert_diffusers_converter_and_load(tmp_path, layout):
    extra = {} if layout == "sd" else dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                           scaling_factor=0.3611, shift_factor=0.1159)
    ref = randomise(AutoencoderKL(**dict(VAE, block_out_channels=(16, 32, 32), down_block_types=VAE["down_block_types"]
                                         + VAE["down_block_types"][:1], up_block_types=VAE["up_block_types"] * 1
                                         + VAE["up_block_types"][:1], **extra))).eval()
    ref_sd = ref.state_dict()
    ldm = diffusers_vae_to_ldm(ref_sd, 3)
    converted = convert_ldm_vae_checkpoint(ldm, dict(ref.config))
    assert set(converted) == set(ref_sd) and all(torch.equal(converted[k], ref_sd[k]) for k in ref_sd)
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        z_ref = ref.config.scaling_factor * (ref.encode(x).latent_dist.mean - (ref.config.shift_factor or 0.0))
    # SD: under first_stage_model. in a whole-model file; FLUX: BFL's bare ae.safetensors; both attention spellings
    for old in (False, True):
        sd = diffusers_vae_to_ldm(ref_sd, 3, old_spelling=old)
        prefix = "first_stage_model." if layout == "sd" else ""
        file = tmp_path / f"vae-{old}.safetensors"
        save_file({prefix + k: v.contiguous() for k, v in sd.items()}, str(file))
        cfg = weights.vae_config_from_keys(sd, norm_num_groups=8)
        assert (cfg.latent_channels, cfg.quant_conv) == ((4, True) if layout == "sd" else (16, False))
        model = weights.load_vae(str(file), config=cfg)
        with torch.no_grad():
            assert rel_err(model.encode(x), z_ref) < 1e-4
            assert rel_err(model.decode(z_ref), ref.decode(z_ref / ref.config.scaling_factor
                                                               + (ref.config.shift_factor or 0.0)).sample) < 1e-4


def test_diffusers_folders_and_single_file_text_encoder(tmp_path):
    tok = write_tokenizer(str(tmp_path / "tokenizer"))
    unet, vae, text_encoder = tiny_parts(tok)
    vae.save_pretrained(tmp_path / "vae")
    ours_vae = weights.load_vae(str(tmp_path / "vae"))
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours_vae.encode(x), 0.18215 * vae.encode(x).latent_dist.mean) < 1e-4
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    save_file({"cond_stage_model.transformer." + k: v for k, v in text_encoder.state_dict().items()},
              str(tmp_path / "te.safetensors"))
    ids = tok(["the cat", "a dog and the cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = text_encoder(ids).last_hidden_state
        for path in (tmp_path / "text_encoder", tmp_path / "te.safetensors"):
            ours = weights.load_text_encoder(str(path))
            assert ours.config.num_attention_heads == TEXT["num_attention_heads"]
            assert rel_err(ours(ids).last_hidden_state, ref) < 1e-6


def test_bad_input(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        weights.load_unet(str(tmp_path / "missing.safetensors"))
    good = tmp_path / "other.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, str(good))
    with pytest.raises(WeightsError, match="not an SD checkpoint"):
        weights.load_unet(str(good))
    with pytest.raises(WeightsError, match="not a VAE checkpoint"):
        weights.load_vae(str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        weights.load_unet(str(truncated))
    # right layout, wrong model: one error naming missing and mis-shaped keys with counts
    with torch.device("meta"):
        sd = {"model.diffusion_model." + k: v for k, v in unet_mod.make_unet("toy-sd").state_dict().items()}
    small = {k: torch.zeros(v.shape) for k, v in list(sd.items())[:40]}
    save_file(small, str(tmp_path / "small.safetensors"))
    with pytest.raises(WeightsError, match=r"missing \d+ \(.*mis-shaped \d+"):
        weights.load_unet(str(tmp_path / "small.safetensors"))
    with pytest.raises(WeightsError, match="holds only the FLUX transformer"):
        pipeline.load(str(good))
    save_file({"encoder.conv_in.weight": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(WeightsError, match="neither an SD1.5"):
        pipeline.load(str(tmp_path / "vae.safetensors"))
    sd_file = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(sd_file))
    with pytest.raises(WeightsError, match="needs a CLIP tokenizer folder"):
        pipeline.load(str(sd_file))
