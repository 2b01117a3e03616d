"""evaluate.py: the measures (saturation, diversity), one method measured on a tiny pipeline (deterministic, every
column), the whole row set trained and evaluated on tiny SD and FLUX pipelines, the Markdown table, bad arguments."""
import argparse

import pytest
import torch

from tiny import pref_pairs, redness, tiny_pipe

import evaluate as E

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def test_saturation_of_pure_grey_and_black_background():
    img = torch.zeros(3, 3, 4, 4)
    img[0, 0] = 1.0                                          # pure red on black: saturation 1
    img[1] = 0.5                                             # grey: 0
    img[2, :, :2] = torch.tensor([1.0, 0.5, 0.5]).view(3, 1, 1)  # half pink (s = 0.5), half black (ignored)
    assert torch.allclose(E.saturation(img), torch.tensor([1.0, 0.0, 0.5]))


def test_diversity_is_zero_for_identical_seeds_and_one_for_orthogonal():
    same = torch.nn.functional.normalize(torch.randn(1, 5, 8), dim=-1).expand(3, 5, 8)
    assert E.diversity(same) == pytest.approx(0.0, abs=1e-6)
    ortho = torch.eye(3)[:, None, :].expand(3, 2, 3)       # seed s -> basis vector s, for both prompts
    assert E.diversity(ortho) == pytest.approx(1.0)


def test_measure_is_deterministic_and_fills_every_column():
    pipe = tiny_pipe("vp", steps=2)
    gen = E.sample_with(pipe, lambda c: pipe.backbone)
    embed = lambda im: torch.nn.functional.normalize(im.flatten(1), dim=-1)  # noqa: E731
    m1, im1 = E.measure(gen, pipe, PROMPTS, [0, 1], redness, None, embed, batch=2)
    m2, im2 = E.measure(gen, pipe, PROMPTS, [0, 1], redness, None, embed, batch=2)
    assert im1.shape == (2, 3, 3, 16, 16) and torch.equal(im1, im2)
    assert set(m1) == {"reward/reward", "diversity", "saturation", "sec_per_image", "per_image"}
    assert len(m1["per_image"]["reward/reward"]) == 6
    assert m1["reward/reward"] == pytest.approx(m2["reward/reward"]) and m1["diversity"] > 0
    assert m1["sec_per_image"] > 0


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_all_rows_train_and_evaluate_on_a_tiny_pipeline(kind, tmp_path):
    pipe = tiny_pipe(kind, steps=2)
    a = argparse.Namespace(variants=["I", "P"], train_steps=1, batch_size=2, lr=1e-2, seed=0, bon=2, rho=[1.0])
    preset = "toy-sd" if kind == "vp" else "toy-flux"
    rows = E.method_rows(pipe, preset, str(tmp_path), a, redness, pref_pairs(), ablation=kind == "vp")
    names = [r[0] for r in rows]
    expect = ["base", "HyperAlign-I", "HyperAlign-P", "static LoRA", "Best-of-2", "guidance ρ=1"]
    expect += ["Direct-Align + SRPO reward"] if kind == "flow" else ["ablation: L_R only", "ablation: L_G only"]
    assert names == expect
    out = E.evaluate_rows(rows, pipe, PROMPTS[:2], [0], redness, None, None)
    by = {r["method"]: r for r in out}
    assert by["base"]["cost_x_base"] == 1.0
    assert by["Best-of-2"]["reward/reward"] >= by["base"]["reward/reward"] - 1e-6   # candidate 0 is the base sample
    assert by["guidance ρ=1"]["reward/reward"] > by["base"]["reward/reward"]
    md = E.markdown("tiny", out)
    assert md.count("\n|") == len(out) + 2 and "× base" in md
    reused = E.method_rows(pipe, preset, str(tmp_path), a, redness, pref_pairs(), ablation=False)  # loads saved runs
    assert [r[0] for r in reused][:4] == expect[:4]


def test_bad_arguments_exit_2():
    for bad in (["--variants", "X"], ["--seeds", "0"], ["--train-steps", "-1"], ["--rho", "a"]):
        with pytest.raises(SystemExit) as e:
            E.parse_args(bad)
        assert e.value.code == 2


def test_claims_compare_hyperalign_with_the_baselines_and_order_the_variants():
    row = lambda m, r, j, s: {"method": m, "reward/r": r, "judge/overall": j, "sec_per_image": s,  # noqa: E731
                              "cost_x_base": s / 1.0}
    rows = [row("base", 0.1, 0.2, 1.0), row("HyperAlign-S", 0.5, 0.4, 2.0), row("HyperAlign-I", 0.3, 0.5, 1.1),
            row("static LoRA", 0.4, 0.3, 1.0), row("Best-of-8", 0.6, 0.3, 8.0), row("guidance ρ=1", 0.7, 0.1, 30.0)]
    text = E.claims(rows, "reward/r")
    assert "- HyperAlign-S beats static LoRA on reward/r: 0.5000 vs 0.4000" in text
    assert "- HyperAlign-I does not beat Best-of-8 on reward/r" in text          # no per-image values: plain means
    assert "quality order on reward/r: S > I" in text and "quality order on judge/overall: I > S" in text
    assert "- guidance ρ=1 costs 30.0x the base model; HyperAlign-I 1.1x" in text


def test_paired_comparison_says_tie_within_noise():
    a = {"r": 0.51, "per_image": {"r": [0.5, 0.6, 0.4, 0.55]}}
    b = {"r": 0.50, "per_image": {"r": [0.6, 0.4, 0.5, 0.5]}}
    c = {"r": 0.40, "per_image": {"r": [0.4, 0.5, 0.3, 0.45]}}
    assert E._versus(a, b, "r").startswith("ties with") and E._versus(a, c, "r") == "beats"
    assert E._versus(c, a, "r") == "loses to"
