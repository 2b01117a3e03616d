"""train.py on tiny random models: a short run raises the reward; checkpoints round-trip; --resume reaches the same
parameters as an uninterrupted run; a non-finite loss stops cleanly; bad arguments exit 2; the FLUX path trains."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train
from test_hyperalign import pref_pairs, redness, tiny_pipe

PROMPTS = [f"a red square number {i}" for i in range(6)]


def args(out, *extra):
    return train.parse_args(["--out", str(out), "--batch-size", "2", "--n-eval", "2", "--save-every", "2",
                             "--lr", "1e-2", *extra])


def run(out, *extra, kind="vp", reward=redness, **kw):
    a = args(out, "--preset", "toy-sd" if kind == "vp" else "toy-flux", *extra)
    return train.run(a, pipe=tiny_pipe(kind), reward=reward, prefs_reader=pref_pairs(), prompts=PROMPTS,
                     eval_prompts=PROMPTS[:2], **kw)


def test_short_run_raises_the_reward_and_writes_its_files(tmp_path):
    m = run(tmp_path, "--steps", "8", "--lambda-reg", "0.1")
    assert m["reward_aligned"] > m["reward_base"] + 1e-3, m
    assert m["reward_change"] == pytest.approx(m["reward_aligned"] - m["reward_base"]) and m["reward_change_se"] >= 0
    for f in ("hypernet.safetensors", "config.json", "optim.pt", "metrics.jsonl", "metrics.json", "samples.png"):
        assert os.path.isfile(tmp_path / f), f
    log = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])      # the loss went down
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))               # atomic writes completed


def test_paired_change_is_the_mean_difference_with_its_standard_error():
    m = train.paired_change("judge", torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert m["judge_change"] == pytest.approx(0.5)
    assert m["judge_change_se"] == pytest.approx(torch.tensor([1.0, 0, 0, 1]).std().item() / 2)


def test_checkpoint_round_trip_and_resume_equality(tmp_path):
    run(tmp_path / "full", "--steps", "4", "--variant", "P", "--no-eval")
    run(tmp_path / "cut", "--steps", "2", "--variant", "P", "--no-eval")
    run(tmp_path / "cut", "--steps", "4", "--variant", "P", "--no-eval", "--resume")
    full, cut = load_file(tmp_path / "full" / "hypernet.safetensors"), load_file(tmp_path / "cut" / "hypernet.safetensors")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert cfg["step"] == 4 and cfg["hyper"]["variant"] == "P" and len(cfg["hyper"]["key_times"]) >= 2
    assert [json.loads(ln)["step"] for ln in open(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4]
    # round trip: the rebuilt HyperAlign makes the same LoRA weights
    pipe = tiny_pipe("vp")
    ha, saved = train.load_hyperalign(str(tmp_path / "full"), pipe.backbone)
    assert ha.cfg.key_times == tuple(cfg["hyper"]["key_times"]) and saved["step"] == 4
    assert all(torch.equal(v, full[k]) for k, v in ha.hypernet.state_dict().items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        r = redness(images, prompts)
        return r * float("nan") if calls["n"] > 6 else r                          # NaN from step 4 on (2 per step)

    with pytest.raises(SystemExit, match="non-finite loss at step 4.*last good checkpoint"):
        run(tmp_path, "--steps", "6", "--no-eval", reward=flaky)
    assert json.load(open(tmp_path / "config.json"))["step"] == 2
    assert load_file(tmp_path / "hypernet.safetensors").keys()


def test_bad_arguments_exit_2(tmp_path, capsys):
    for bad in (["--steps", "-1"], ["--variant", "X"], ["--batch-size", "0"], ["--lr", "-1"], ["--n-eval", "0"],
                ["--eval-seeds", "0"], ["--model", "/nowhere/sd15"], ["--reward-from", "1"], ["--reward-from", "-0.1"]):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path), *bad])
        assert e.value.code == 2, bad
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "none"), "--resume", "--model", "/nowhere", "--reward", "x",
                    "--prompts", "/nowhere.txt"])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_flux_path_trains(tmp_path):
    m = run(tmp_path, "--steps", "3", "--variant", "S", kind="flow")
    assert set(m) >= {"reward_base", "reward_aligned"} and m["trainable_params"] > 0
    sd = load_file(tmp_path / "hypernet.safetensors")
    assert any(k.startswith("b_aux.") and v.abs().sum() > 0 for k, v in sd.items())  # it learned something


def test_sample_cli_with_hyper(tmp_path):
    """sample.py --hyper DIR: an untrained hypernetwork reproduces the base image exactly; a non-zero one changes it."""
    import numpy as np
    from PIL import Image
    from sd_tiny import write_pipeline

    import hyperalign as H
    import sample
    import sampler
    import weights
    folder = tmp_path / "sd"
    write_pipeline(str(folder))
    pipe = weights.load_sd(str(folder))
    ha = H.HyperAlign(H.HyperConfig.preset("toy-sd", variant="P", key_times=(981.0, 501.0)),
                      H.Backbone("vp", pipe.unet, sampler.VPSchedule.from_config(pipe.scheduler)))
    opt = torch.optim.AdamW(ha.hypernet.parameters())
    os.makedirs(tmp_path / "ha")
    train.save_checkpoint(str(tmp_path / "ha"), ha, opt, 0, {})
    common = ["--model", str(folder), "--prompt", "a cat", "--steps", "4", "--height", "32", "--width", "32",
              "--device", "cpu"]
    images = {}
    for name, extra in (("base", []), ("zero", ["--hyper", str(tmp_path / "ha")]), ("trained", None)):
        if extra is None:                                                             # a hypernetwork that does something
            with torch.no_grad():
                for b in ha.hypernet.b_aux:
                    b.normal_(std=0.5)
            train.save_checkpoint(str(tmp_path / "ha"), ha, opt, 1, {})
            extra = ["--hyper", str(tmp_path / "ha")]
        assert sample.main([*common, *extra, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"), dtype=np.int16)
    assert np.array_equal(images["zero"], images["base"])
    assert np.abs(images["trained"] - images["base"]).max() > 0
    assert sample.main([*common, "--hyper", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")]) == 2


def test_bf16_model_with_gradient_checkpointing_trains(tmp_path):
    """The real-model setting: frozen models in bf16, fp32 latents and hypernetwork, gradient checkpointing."""
    pipe = tiny_pipe("vp")
    pipe.backbone.model.to(torch.bfloat16), pipe.vae.to(torch.bfloat16)
    text = pipe.text
    pipe.text = lambda p: text(p).to(torch.bfloat16)
    a = args(tmp_path, "--preset", "toy-sd", "--steps", "2", "--grad-ckpt", "--no-eval")
    train.run(a, pipe=pipe, reward=redness, prefs_reader=pref_pairs(), prompts=PROMPTS)
    sd = load_file(tmp_path / "hypernet.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert any(k.startswith("b_aux.") and v.abs().sum() > 0 for k, v in sd.items())


def test_toy_default_trains_on_hyper_train_and_scores_unseen_then_heldout(tmp_path, monkeypatch):
    """The toy world's default: prompts from 'hyper-train', scored on 'unseen' (top level) and 'heldout' (nested)."""
    import toy
    seen = {}
    real = train.evaluate

    def spy(ha, pipe, reward, prompts, seed, judge=None, batch=16):
        seen[seed] = list(prompts)
        return real(ha, pipe, reward, prompts, seed, judge, batch)
    monkeypatch.setattr(train, "evaluate", spy)
    a = train.parse_args(["--out", str(tmp_path), "--variant", "I", "--steps", "1", "--batch-size", "1",
                          "--sample-steps", "2", "--n-eval", "2", "--eval-seeds", "1", "--lambda-reg", "0"])
    m = train.run(a)
    assert set(seen[10_000]) <= set(toy.prompts("unseen")) and set(seen[20_000]) <= set(toy.prompts("heldout"))
    assert len(seen[10_000]) == len(seen[20_000]) == 2
    for part in (m, m["heldout"]):
        assert {"reward_base", "reward_aligned", "judge_base", "judge_aligned", "judge_change"} <= set(part)
    assert json.load(open(tmp_path / "metrics.json"))["heldout"]["judge_base_parts"]["count"] >= 0


def test_reward_steps_come_from_the_later_part_of_the_trajectory(monkeypatch):
    """--reward-from 0.5: L_R only at steps of the later half; 0: any step (L_G always from the whole schedule)."""
    import hyperalign as ha_mod
    from test_hyperalign import make_ha
    assert [train.first_reward_step(20, f) for f in (0.0, 0.5, 0.99)] == [0, 10, 19]
    pipe = tiny_pipe("vp")
    pipe.steps = 6
    ha, ts = make_ha(pipe, "S"), pipe.timesteps()
    seen, real = [], ha_mod.reward_loss
    monkeypatch.setattr(ha_mod, "reward_loss", lambda *a, **k: seen.append(float(a[3][0])) or real(*a, **k))
    for reward_from in (0.5, 0.0):
        seen.clear()
        for i in range(8):
            train.train_step(ha, pipe, redness, ["a", "b"], None, 0.0, torch.Generator().manual_seed(i), [],
                             reward_from=reward_from)
        steps = {[float(t) for t in ts].index(t) for t in seen}
        assert steps <= set(range(3, 6)) if reward_from else len(steps & {0, 1, 2}) > 0, (reward_from, steps)
