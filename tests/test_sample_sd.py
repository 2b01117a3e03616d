"""The whole SD pipeline through sample.py against diffusers' StableDiffusionPipeline, and the CLI's bad input."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from sd_tiny import write_pipeline

import pipeline
import sample
import weights


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return write_pipeline(str(folder)), folder


def test_sample_equals_diffusers_pipeline(tiny_sd, tmp_path):
    pipe, folder = tiny_sd
    kw = dict(prompt="the cat and a dog", negative_prompt="blurry", seed=7, steps=6, guidance=7.5, height=32, width=24)
    ref = pipe(kw["prompt"], negative_prompt=kw["negative_prompt"], height=kw["height"], width=kw["width"],
               num_inference_steps=kw["steps"], guidance_scale=kw["guidance"], num_images_per_prompt=2,
               generator=torch.Generator("cpu").manual_seed(kw["seed"]), output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    out = tmp_path / "img.png"
    assert sample.main(["--model", str(folder), "--prompt", kw["prompt"], "--negative-prompt", kw["negative_prompt"],
                        "--seed", "7", "--steps", "6", "--guidance", "7.5", "--height", "32", "--width", "24",
                        "--batch", "2", "--out", str(out), "--device", "cpu"]) == 0
    ours = np.stack([np.asarray(Image.open(tmp_path / f"img-{i}.png")) for i in range(2)])
    assert ours.shape == ref.shape == (2, 32, 24, 3)
    diff = np.abs(ours.astype(np.float64) - ref).mean()
    assert diff <= 0.5, diff  # mean abs difference <= 0.5/255 after 8-bit rounding
    assert ours.std() > 1.0  # not a blank image


def test_single_file_pipeline_equals_folder(tiny_sd, tmp_path):
    """An LDM single file (U-Net, VAE, text encoder under their prefixes) + a tokenizer folder = the same pipeline."""
    from test_weights_sd import diffusers_unet_to_ldm, diffusers_vae_to_ldm
    pipe, folder = tiny_sd
    sd = diffusers_unet_to_ldm(pipe.unet.state_dict(), 1, [False, True])
    sd.update({"first_stage_model." + k: v.contiguous() for k, v in diffusers_vae_to_ldm(pipe.vae.state_dict(), 2).items()})
    sd.update({"cond_stage_model.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    ours = pipeline.load(str(tmp_path / "tiny.safetensors"), tokenizer=str(folder / "tokenizer"), steps=3, height=16,
                         unet_config=weights.load_unet(str(folder)).config,
                         vae_config=weights.load_vae(str(folder)).config)
    ref = pipeline.load(str(folder), steps=3, height=16)
    x_T = ref.noise(1, torch.Generator().manual_seed(0))
    assert torch.equal(ours.generate(["a cat"], x_T), ref.generate(["a cat"], x_T))


def test_long_prompt_is_truncated_with_a_warning(tiny_sd):
    pipe = pipeline.load(str(tiny_sd[1]))
    with pytest.warns(UserWarning, match="truncated to 77 tokens"):
        context = pipe.text(["the cat " * 60])
    assert context.shape == (1, 77, 64)


@pytest.mark.parametrize("bad, message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--height", "30"], "multiples of 8"),
    (["--out", "img.txt"], "--out must end in"),
    (["--model", "/no/such/path"], "no such file or folder"),
])
def test_cli_bad_input_exits_2(tiny_sd, tmp_path, capsys, bad, message):
    args = {"--model": str(tiny_sd[1]), "--prompt": "a cat", "--out": str(tmp_path / "x.png"), "--steps": "2",
            "--height": "16", "--width": "16", "--device": "cpu"}
    args.update(dict(zip(bad[::2], bad[1::2])))
    assert sample.main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_cli_non_sd_and_truncated_files(tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(other))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(other.read_bytes()[:-5])
    for path, message in [(other, "neither an SD1.5"), (truncated, "truncated or corrupt")]:
        assert sample.main(["--model", str(path), "--prompt", "p", "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err


def test_cli_argparse_errors_exit_2():
    run = subprocess.run([sys.executable, "sample.py", "--prompt", "a cat", "--steps", "many"], capture_output=True,
                         text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert run.returncode == 2 and "error:" in run.stderr
