"""End to end: a tiny FLUX folder written by diffusers' FluxPipeline, sampled by us and by FluxPipeline."""
import json
import string

import pytest
import torch
from conftest import rel_err
from test_flux import tiny_diffusers_flux
from test_sampler_flow import DEV, SCHNELL

import weights
from sampler import flow_sample, flux_cond, flux_model_fn, image_ids, pack, unpack


def tiny_clip_tokenizer(folder):
    """A real CLIPTokenizer over a 54-token vocabulary (letters, letters + </w>), built offline."""
    from transformers import CLIPTokenizer
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [c + suffix for suffix in ("", "</w>") for c in string.ascii_lowercase]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def tiny_clip_text(hidden):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=54, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def tiny_flux_pipeline(folder, guidance: bool):
    """A FluxPipeline folder: tiny transformer, 16-channel FLUX VAE, CLIP-L and a small CLIP standing in for T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=0.3611, shift_factor=0.1159).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(DEV if guidance else SCHNELL)), vae=vae,
        text_encoder=tiny_clip_text(10), tokenizer=tiny_clip_tokenizer(folder / "_tok"),
        text_encoder_2=tiny_clip_text(12), tokenizer_2=tiny_clip_tokenizer(folder / "_tok"),
        transformer=tiny_diffusers_flux(in_channels=64, num_attention_heads=2, attention_head_dim=16,
                                        axes_dims_rope=(4, 6, 6), guidance_embeds=guidance))
    pipe.save_pretrained(folder)
    return pipe


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_sampling_matches_flux_pipeline(variant, tmp_path):
    B, H, W, steps, guidance = 2, 32, 32, 4, 3.5
    ref = tiny_flux_pipeline(tmp_path, guidance=variant == "dev")
    prompts = ["a cat in the snow", "dog"]
    h = w = 2 * (H // 4)  # latent size: VAE factor 2 (two blocks), packed 2x2
    x_T = pack(torch.randn(B, 16, h, w))

    with torch.no_grad():
        ref_img = ref(prompt=prompts, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
                      max_sequence_length=16, latents=x_T, output_type="pt").images
        ref_txt, ref_y, _ = ref.encode_prompt(prompts, prompt_2=None, max_sequence_length=16)

    pipe = weights.load_flux_pipeline(str(tmp_path), max_length=16)
    assert pipe.shift == (variant == "dev")
    txt, y = pipe.encode(prompts)
    assert rel_err(txt, ref_txt) < 1e-6 and rel_err(y, ref_y) < 1e-6
    cond = flux_cond(txt, y, image_ids(B, h, w), guidance if variant == "dev" else None)
    with torch.no_grad():
        x_0 = flow_sample(flux_model_fn(pipe.transformer), x_T, cond, steps=steps, shift=pipe.shift)
        img = (pipe.vae.decode(unpack(x_0, h, w)) / 2 + 0.5).clamp(0, 1)
    err = rel_err(img, ref_img)
    print(f"{variant}: images rel err {err:.2e}")
    assert err < 1e-4
