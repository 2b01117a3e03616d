"""export_lora.py: the LoRA a HyperAlign-I run makes for one prompt and seed, loaded by diffusers' own
`load_lora_weights`, gives the image sample.py --hyper gives (SD1.5 kohya layout on the toy SD folder; FLUX in diffusers
and kohya/BFL layouts on a tiny FLUX folder), while the base image differs clearly; P writes one file per segment."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_sample_flux import tiny_flux_pipeline

import export_lora
import hyperalign as H
import pipeline
import rundir
import runs
import sample
from config import RunConfig
from toy import world

PROMPT = "a red circle left of a blue square"


def make_run(folder, model: str, preset: str, variant: str = "I", steps: int = 6, **run) -> str:
    """A HyperAlign run whose decoder moved off its initial copy (Δθ != 0), as training leaves it."""
    cfg = RunConfig.from_preset(preset, model=model, out=str(folder), sample_steps=steps, **run)
    pipe = pipeline.load(cfg.model)
    torch.manual_seed(0)
    ha = H.HyperAlign(H.HyperConfig.preset(preset, variant=variant, key_steps=(0, 2, 4), key_of=steps), pipe.backbone)
    with torch.no_grad():
        for p in ha.hypernet.decoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rundir.create(cfg.out, False, {"method": "hyperalign", "run": cfg.to_dict(), "hyper": ha.cfg.to_dict()})
    rundir.save(cfg.out, 0, ha.hypernet, torch.optim.AdamW(ha.hypernet.parameters()))
    return cfg.out


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def diffusers_image(pipe, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.int16)


def test_sd_kohya_lora_through_diffusers_equals_sample_py(tmp_path):
    from diffusers import StableDiffusionPipeline
    run = make_run(tmp_path / "run", world.SD_DIR, "toy-sd")
    assert export_lora.main(["--hyper", run, "--prompt", PROMPT, "--seed", "3", "--out",
                             str(tmp_path / "lora.safetensors")]) == 0
    common = ["--prompt", PROMPT, "--seed", "3", "--device", "cpu"]
    assert sample.main(["--hyper", run, *common, "--out", str(tmp_path / "ours.png")]) == 0
    assert sample.main(["--model", world.SD_DIR, "--steps", "6", "--guidance", "5", *common,
                        "--out", str(tmp_path / "base.png")]) == 0
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["prompt"] == PROMPT and meta["seed"] == "3" and meta["steps"] == "6" and meta["guidance"] == "5.0"
    assert meta["variant"] == "I" and meta["covers_steps"] == "0-5" and meta["height"] == "32"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    dp = StableDiffusionPipeline.from_pretrained(world.SD_DIR, safety_checker=None, requires_safety_checker=False)
    dp.load_lora_weights(str(tmp_path / "lora.safetensors"))
    theirs = diffusers_image(dp, num_inference_steps=6, guidance_scale=5.0, height=32, width=32)
    ours, base = image(tmp_path / "ours.png"), image(tmp_path / "base.png")
    print(f"SD kohya: mean |ours - diffusers| {np.abs(ours - theirs).mean():.4f}, vs base {np.abs(ours - base).mean():.1f}")
    assert np.abs(ours - theirs).mean() < 0.5 and np.abs(ours - base).mean() > 5


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_flux_lora_through_diffusers_equals_sample_py(tmp_path, fmt):
    from diffusers import FluxPipeline
    folder = tmp_path / "flux"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tiny_flux_pipeline(folder, guidance=False)
    run = make_run(tmp_path / "run", str(folder), "toy-flux", resolution=32)
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["run"]["resolution"] == 32
    out = tmp_path / f"{fmt}.safetensors"
    assert export_lora.main(["--hyper", run, "--prompt", PROMPT, "--seed", "3", "--format", fmt, "--out", str(out)]) == 0
    common = ["--prompt", PROMPT, "--seed", "3", "--device", "cpu"]
    assert sample.main(["--hyper", run, *common, "--out", str(tmp_path / "ours.png")]) == 0
    assert sample.main(["--model", str(folder), "--steps", "6", "--height", "32", "--width", "32", *common,
                        "--out", str(tmp_path / "base.png")]) == 0
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    want = ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight" if fmt == "diffusers" else
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
    assert want in keys
    dp = FluxPipeline.from_pretrained(str(folder))
    dp.load_lora_weights(str(out))
    theirs = diffusers_image(dp, num_inference_steps=6, height=32, width=32, max_sequence_length=77)
    ours, base = image(tmp_path / "ours.png"), image(tmp_path / "base.png")
    print(f"FLUX {fmt}: mean |ours - diffusers| {np.abs(ours - theirs).mean():.4f}, vs base "
          f"{np.abs(ours - base).mean():.1f}")
    assert np.abs(ours - theirs).mean() < 0.5 and np.abs(ours - base).mean() > 2


def test_p_writes_one_file_per_segment_with_the_lora_of_its_steps(tmp_path):
    run = make_run(tmp_path / "run", world.SD_DIR, "toy-sd", variant="P")
    assert export_lora.main(["--hyper", run, "--prompt", PROMPT, "--seed", "1", "--out",
                             str(tmp_path / "p.safetensors")]) == 0
    names = sorted(f for f in os.listdir(tmp_path) if f.startswith("p-steps-"))
    assert names == ["p-steps-000-001.safetensors", "p-steps-002-003.safetensors", "p-steps-004-005.safetensors"]
    # each file holds the factors the sampler made at its first step
    pipe = pipeline.load(world.SD_DIR, steps=6, guidance=5.0)
    ha, _ = runs.load_trained(run, pipe.backbone)
    segs = export_lora.segments(ha, pipe, PROMPT, 1)
    for (first, last, factors), name in zip(segs, names):
        with safe_open(str(tmp_path / name), "pt") as f:
            A = f.get_tensor("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.lora_down.weight")
            assert f.metadata()["covers_steps"] == f"{first}-{last}"
        assert torch.equal(A, factors["mid_block.attentions.0.transformer_blocks.0.attn2.to_v"][0])


def test_bad_input_exits_2(tmp_path, capsys):
    run = make_run(tmp_path / "run", world.SD_DIR, "toy-sd")
    for argv, culprit in ((["--out", str(tmp_path / "x.png")], ".safetensors"),
                          (["--format", "diffusers", "--out", str(tmp_path / "x.safetensors")], "for FLUX"),
                          (["--hyper", str(tmp_path / "none"), "--out", str(tmp_path / "x.safetensors")], "none")):
        args = ["--hyper", run, "--prompt", PROMPT, *argv]
        assert export_lora.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and culprit in err[0], err
