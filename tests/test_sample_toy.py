"""sample.py on the shipped toy folders: no size flags needed (the VAE config's sample_size: 32 px); a tokenizer folder
written by current transformers (tokenizer.json only) works; --hyper takes the run's own sampling settings."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline
import sample
import weights
from toy import world
from vae import make_vae


@pytest.mark.parametrize("folder", [world.SD_DIR, world.FLUX_DIR], ids=["toy-sd", "toy-flux"])
def test_toy_folder_samples_at_its_own_size(folder, tmp_path):
    out = str(tmp_path / "x.png")
    extra = ["--guidance", "5"] if folder == world.SD_DIR else []
    rc = sample.main(["--model", folder, "--prompt", "a red circle left of a blue square", "--steps", "4",
                      "--out", out, "--device", "cpu"] + extra)
    assert rc == 0 and os.path.isfile(out)
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3) and image.std() > 5  # a picture, not a flat field


def test_default_size_rule():
    assert pipeline.default_size(pipeline.load(world.SD_DIR).vae, "sd") == 32
    vae = make_vae("toy-sd")                                 # no sample_size in its config: SD1.5's / FLUX's size
    assert pipeline.default_size(vae, "sd") == 512 and pipeline.default_size(vae, "flux") == 1024


def test_tokenizer_folder_saved_by_current_transformers(tmp_path):
    """`save_pretrained` of a CLIP tokenizer now writes tokenizer.json + tokenizer_config.json only: a pipeline folder
    with that layout loads and samples the same image as the original folder."""
    folder = tmp_path / "sd"
    shutil.copytree(world.SD_DIR, folder)
    tok = weights.load_tokenizer(str(folder / "tokenizer"))
    shutil.rmtree(folder / "tokenizer")
    tok.save_pretrained(str(folder / "tokenizer"))
    assert not (folder / "tokenizer" / "vocab.json").exists() and (folder / "tokenizer" / "tokenizer.json").exists()
    args = ["--prompt", "a red circle", "--steps", "3", "--guidance", "5", "--device", "cpu"]
    assert sample.main(["--model", world.SD_DIR, *args, "--out", str(tmp_path / "a.png")]) == 0
    assert sample.main(["--model", str(folder), *args, "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_hyper_run_supplies_model_steps_guidance_and_size(tmp_path, monkeypatch):
    """sample.py --hyper DIR: unless given, the model, steps, guidance and size are the run's (a toy run: 20 DDIM steps,
    CFG 5, 32 px)."""
    import hyperalign as H
    import rundir
    from config import RunConfig
    cfg = RunConfig(out=str(tmp_path / "run"), sample_steps=3, guidance=4.0)
    pipe = pipeline.load(cfg.model)
    ha = H.HyperAlign(H.HyperConfig.preset("toy-sd"), pipe.backbone)
    rundir.create(cfg.out, False, {"method": "hyperalign", "run": cfg.to_dict(), "hyper": ha.cfg.to_dict()})
    rundir.save(cfg.out, 0, ha.hypernet, torch.optim.AdamW(ha.hypernet.parameters()))
    seen = {}
    real = pipeline.load
    monkeypatch.setattr(pipeline, "load", lambda *a, **k: seen.update(args=a) or real(*a, **k))
    assert sample.main(["--hyper", cfg.out, "--prompt", "a red circle", "--device", "cpu",
                        "--out", str(tmp_path / "x.png")]) == 0
    model, device, dtype, height, width, steps, guidance = seen["args"][:7]
    assert (model, height, width, steps, guidance) == (cfg.model, None, None, 3, 4.0)
    assert np.asarray(Image.open(tmp_path / "x.png")).shape == (32, 32, 3)
    assert json.load(open(os.path.join(cfg.out, "config.json")))["run"]["sample_steps"] == 3
