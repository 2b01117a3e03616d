"""Does `sample.py` run on the shipped toy folders with no size flags (the VAE config's sample_size: 32 px)?"""
import os

import numpy as np
import pytest
from PIL import Image

import sample
import toy


@pytest.mark.parametrize("folder", [toy.SD_DIR, toy.FLUX_DIR], ids=["toy-sd", "toy-flux"])
def test_toy_folder_samples_at_its_own_size(folder, tmp_path):
    out = str(tmp_path / "x.png")
    extra = ["--guidance", "5"] if folder == toy.SD_DIR else []
    rc = sample.main(["--model", folder, "--prompt", "a red circle left of a blue square", "--steps", "4",
                      "--out", out, "--device", "cpu"] + extra)
    assert rc == 0 and os.path.isfile(out)
    image = np.asarray(Image.open(out))
    assert image.shape == (32, 32, 3) and image.std() > 5  # a picture, not a flat field


def test_default_size_rule(tmp_path):
    assert sample.default_size(toy.SD_DIR, "sd") == 32
    assert sample.default_size(str(tmp_path), "sd") == 512  # no vae/config.json: SD1.5's size
    assert sample.default_size(str(tmp_path), "flux") == 1024
