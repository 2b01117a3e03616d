"""End to end: a tiny FLUX folder written by diffusers' FluxPipeline, sampled by us and by FluxPipeline."""
import json
import string

import pytest
import torch
from conftest import rel_err
from test_flux import tiny_diffusers_flux
from test_sampler_flow import DEV, SCHNELL

import pipeline
import weights_flux
from sampler import image_ids, pack


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


def tiny_flux_pipeline(folder, guidance: bool, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)):
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
        transformer=tiny_diffusers_flux(in_channels=64, num_attention_heads=num_attention_heads,
                                        attention_head_dim=attention_head_dim, axes_dims_rope=axes_dims_rope,
                                        guidance_embeds=guidance))
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

    pipe = pipeline.load(str(tmp_path), max_length=16, height=H, width=W, steps=steps, guidance=guidance)
    assert pipe.shift == (variant == "dev")
    txt, y = pipe.text(prompts)
    assert rel_err(txt, ref_txt) < 1e-6 and rel_err(y, ref_y) < 1e-6
    cond, uncond = pipe.conds(prompts)
    assert uncond is None and torch.equal(cond["img_ids"], image_ids(B, h, w)) and \
        (cond.get("guidance") is not None) == (variant == "dev")
    img = pipe.decode(pipe.rollout(pipe.backbone, x_T, cond, trajectory=False))
    err = rel_err(img, ref_img)
    print(f"{variant}: images rel err {err:.2e}")
    assert err < 1e-4


# ------------------------------------------------------------------------------------------------------------ CLI

@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A dev-style folder whose transformer has FLUX.1's head dim 128 (one head), so that its BFL file needs no
    axes_dim; and that file."""
    from safetensors.torch import save_file
    folder = tmp_path_factory.mktemp("flux")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = tiny_flux_pipeline(folder, guidance=True, num_attention_heads=1, attention_head_dim=128,
                                 axes_dims_rope=(16, 56, 56))
    save_file(weights_flux.flux_diffusers_to_bfl(ref.transformer.state_dict()), str(folder / "flux1-tiny.safetensors"))
    return folder, ref


def test_cli_matches_flux_pipeline_from_folder_and_bfl_file(flux_folder, tmp_path):
    import numpy as np
    from PIL import Image

    import sample
    folder, ref = flux_folder
    args = ["--prompt", "a red fox", "--seed", "3", "--steps", "3", "--guidance", "4.0", "--height", "32",
            "--width", "48"]
    assert sample.main(["--model", str(folder), *args, "--out", str(tmp_path / "a.png")]) == 0
    assert sample.main(["--model", str(folder / "flux1-tiny.safetensors"), "--components", str(folder), *args,
                        "--out", str(tmp_path / "b.png")]) == 0
    ours = np.asarray(Image.open(tmp_path / "a.png")).astype(np.int16)
    assert np.array_equal(ours, np.asarray(Image.open(tmp_path / "b.png")))
    with torch.no_grad():
        theirs = ref(prompt="a red fox", height=32, width=48, num_inference_steps=3, guidance_scale=4.0,
                     max_sequence_length=77,
                     generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    theirs = (theirs * 255).round().astype(np.int16)
    assert ours.shape == theirs.shape == (32, 48, 3)
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01  # uint8 rounding only


@pytest.mark.parametrize("extra, message", [
    (["--negative-prompt", "blurry"], "--negative-prompt and --eta do not apply"),
    (["--model", "FILE"], "holds only the FLUX transformer: pass --components"),
    (["--model", "FILE", "--components", "nowhere"], "no such FLUX pipeline folder: nowhere"),
    (["--model", "EMPTY"], "not a diffusers pipeline folder (no model_index.json)"),
])
def test_cli_bad_input_exits_2(flux_folder, tmp_path, capsys, extra, message):
    import sample
    folder, _ = flux_folder
    extra = [a.replace("FILE", str(folder / "flux1-tiny.safetensors")).replace("EMPTY", str(tmp_path / "e"))
             for a in extra]
    (tmp_path / "e").mkdir()
    argv = ["--model", str(folder), "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32", *extra,
            "--out", str(tmp_path / "x.png")]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
