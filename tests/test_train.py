"""train.py / runs.py on tiny random models: a short run raises the reward and writes its files; checkpoints round-trip;
--resume reaches the same parameters as an uninterrupted run; a non-finite loss stops cleanly; bad arguments exit 2;
the FLUX path, bf16 + gradient checkpointing, and the toy defaults (prompt splits) work."""
import json
import os
from dataclasses import replace

import pytest
import torch
from conftest import rel_err
from tiny import pref_pairs, redness, run_cfg, tiny_pipe, train_run

import config
import prefs
import losses
import rundir
import runs
import scoring
import train


def run(out, tmp_path, kind="vp", reward=redness, resume=False, **kw):
    cfg = run_cfg(out, tmp_path, kind, **kw)
    return train_run("hyperalign", cfg, resume, pipe=tiny_pipe(kind), reward=reward, prefs_reader=pref_pairs())


def weights(out):
    return rundir.load(str(out))[0]


def test_short_run_raises_the_reward_and_writes_its_files(tmp_path):
    m = run(tmp_path / "run", tmp_path, steps=8, lambda_reg=0.1)
    e, key = m["eval"]["eval"], "reward/reward"
    assert e["aligned"][key] > e["base"][key] + 1e-3, e
    assert e["change"][key]["mean"] == pytest.approx(e["aligned"][key] - e["base"][key]) and e["change"][key]["se"] > 0
    assert e["base"]["sec_per_image"] > 0 and e["aligned"]["sec_per_image"] > 0
    out = tmp_path / "run"
    for f in ("config.json", "checkpoint.json", "metrics.jsonl", "metrics.json", "samples.png"):
        assert os.path.isfile(out / f), f
    assert sorted(d for d in os.listdir(out) if d.startswith("ckpt-")) == ["ckpt-000008"]   # older ones removed
    log = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 9))
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])      # the loss went down
    assert not any(".tmp" in n for n in os.listdir(out))                             # atomic writes completed
    saved = json.load(open(out / "config.json"))
    assert saved["method"] == "hyperalign" and saved["run"]["steps"] == 8 and saved["hyper"]["variant"] == "I"


def test_paired_change_is_the_mean_difference_with_its_standard_error():
    m = scoring.paired_change(torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0, float("nan")]))
    assert m["mean"] == pytest.approx(0.5)                                   # the NaN pair (no relation) left out
    assert m["se"] == pytest.approx(torch.tensor([1.0, 0, 0, 1]).std().item() / 2)
    mean, half = scoring.t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and half == pytest.approx(4.303 * 1.0 / 3 ** 0.5, rel=1e-4)


def test_checkpoint_round_trip_and_resume_equality(tmp_path):
    run(tmp_path / "full", tmp_path, steps=4, variant="P", no_eval=True)
    run(tmp_path / "cut", tmp_path, steps=2, variant="P", no_eval=True)
    run(tmp_path / "cut", tmp_path, steps=4, variant="P", no_eval=True, resume=True)
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == cut.keys() and all(torch.equal(full[k], cut[k]) for k in full)
    cfg = json.load(open(tmp_path / "full" / "config.json"))
    assert rundir.load(str(tmp_path / "full"))[2] == 4 and cfg["hyper"]["variant"] == "P"
    assert len(cfg["hyper"]["key_steps"]) >= 2 and cfg["hyper"]["key_of"] == 4
    assert [json.loads(ln)["step"] for ln in open(tmp_path / "cut" / "metrics.jsonl")] == [1, 2, 3, 4]
    # round trip: the rebuilt HyperAlign makes the same LoRA weights
    pipe = tiny_pipe("vp")
    ha, saved = runs.load_trained(str(tmp_path / "full"), pipe.backbone)
    assert ha.cfg.key_steps == tuple(cfg["hyper"]["key_steps"]) and saved["step"] == 4
    assert all(torch.equal(v, full[k]) for k, v in ha.hypernet.state_dict().items())


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        r = redness(images, prompts)
        return r * float("nan") if calls["n"] > 3 else r              # NaN from step 4 on (one batched call per step)

    with pytest.raises(SystemExit, match="non-finite values at step 4.*last good checkpoint"):
        run(tmp_path / "r", tmp_path, steps=6, no_eval=True, reward=flaky)
    assert rundir.load(str(tmp_path / "r"))[2] == 2


@pytest.mark.parametrize("bad", [["--steps", "-1"], ["--variant", "X"], ["--batch-size", "0"], ["--lr", "-1"],
                                 ["--n-eval", "0"], ["--eval-seeds", "0"], ["--reward-from", "1"],
                                 ["--reward-from", "-0.1"], ["--preset", "sd15"], ["--reward-mode", "x"],
                                 ["--preset", "sd15", "--model", "m", "--reward", "r", "--prompts", "p"]])
def test_bad_arguments_exit_2(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(tmp_path / "r"), *bad])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err, bad


def test_bad_paths_exit_2_with_one_line(tmp_path, capsys):
    for argv in (["--model", "/nowhere/sd15"], ["--prompts", "/nowhere.txt"], ["--eval-prompts", "toy:nosuch"],
                 ["--reward", "nosuch"], ["--prefs", "/nowhere.parquet"]):
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(tmp_path / "r"), "--steps", "1", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
        assert not os.path.exists(tmp_path / "r"), argv                         # nothing written


def test_flux_path_trains(tmp_path):
    m = run(tmp_path / "r", tmp_path, kind="flow", steps=3, variant="S")
    assert {"base", "aligned", "change"} <= set(m["eval"]["eval"]) and m["trainable_params"] > 0
    w = weights(tmp_path / "r")
    assert not torch.equal(w["decoder.head.weight"], w["decoder0.head.weight"])           # it learned something


def test_bf16_model_with_gradient_checkpointing_trains(tmp_path):
    """The real-model setting: frozen models in bf16, fp32 latents and hypernetwork, gradient checkpointing."""
    pipe = tiny_pipe("vp")
    pipe.backbone.model.to(torch.bfloat16), pipe.vae.to(torch.bfloat16)
    text = pipe.text
    pipe.text = lambda p: text(p).to(torch.bfloat16)
    cfg = run_cfg(tmp_path / "r", tmp_path, steps=2, grad_ckpt=True, no_eval=True)
    train_run("hyperalign", cfg, pipe=pipe, reward=redness, prefs_reader=pref_pairs())
    sd = weights(tmp_path / "r")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert not torch.equal(sd["decoder.head.weight"], sd["decoder0.head.weight"])


def test_toy_default_trains_on_hyper_train_and_scores_unseen_then_heldout(tmp_path, monkeypatch):
    """The toy world's default: prompts from 'hyper-train', scored on 'unseen' then 'heldout' with the judge; L_G's
    pairs hold no scored prompt."""
    from toy import world
    seen = {}
    real = scoring.evaluate

    def spy(method, pipe, reward, prompts, seeds, judge=None, batch=16, desc=""):
        seen[seeds[0]] = list(prompts)
        return real(method, pipe, reward, prompts, seeds, judge, batch, desc)
    monkeypatch.setattr(scoring, "evaluate", spy)
    cfg = replace(config.RunConfig(), out=str(tmp_path / "r"), steps=1, batch_size=1, sample_steps=2, n_eval=2,
                  eval_seeds=1, lambda_reg=0.0)
    m = train_run("hyperalign", cfg)
    assert set(seen[10_000]) <= set(world.prompts("unseen")) and set(seen[20_000]) <= set(world.prompts("heldout"))
    assert len(seen[10_000]) == len(seen[20_000]) == 2 and list(m["eval"]) == ["unseen", "heldout"]
    judged = {f"judge/{k}" for k in ("count", "colour", "shape", "binding", "position", "overall")}
    for part in m["eval"].values():
        assert {"reward/toy-comp", *judged} <= set(part["base"]) and {"reward/toy-comp", *judged} <= set(part["change"])


def test_reward_steps_come_from_the_later_part_of_the_trajectory(monkeypatch):
    """--reward-from 0.5: L_R only at steps of the later half; 0: any step (L_G always from the whole schedule)."""
    from tiny import make_ha
    assert [losses.first_reward_step(20, f) for f in (0.0, 0.5, 0.99)] == [0, 10, 19]
    pipe = tiny_pipe("vp", steps=6)
    ha, ts = make_ha(pipe, "S"), pipe.timesteps()
    seen, real = [], losses.reward_loss
    monkeypatch.setattr(losses, "reward_loss", lambda *a, **k: seen.extend(a[3].tolist()) or real(*a, **k))
    for reward_from in (0.5, 0.0):
        seen.clear()
        for i in range(8):
            losses.training_step(ha, pipe, redness, ["a", "b"], None, 0.0, torch.Generator().manual_seed(i), reward_from)
        steps = {[float(t) for t in ts].index(float(t)) for t in seen}
        assert steps <= set(range(3, 6)) if reward_from else len(steps & {0, 1, 2}) > 0, (reward_from, steps)


def test_the_reward_gradient_reaches_decoded_pixels_outside_0_1(monkeypatch):
    """L_R scores the clamped image, but its gradient passes the clamp: pixels below 0 or above 1 still learn."""
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = losses.clamp_straight_through(x)
    y.sum().backward()
    assert y.tolist() == [0.0, 0.5, 1.0] and x.grad.tolist() == [1.0, 1.0, 1.0]
    from tiny import make_ha
    pipe = tiny_pipe("vp", steps=4)
    ha, decoded, real = make_ha(pipe, "I"), [], pipe.decode

    def spy(x0, clamp=True):
        images = real(x0, clamp=clamp)
        images.retain_grad()
        decoded.append((images, clamp))
        return images
    monkeypatch.setattr(pipe, "decode", spy)
    losses.training_step(ha, pipe, redness, ["a", "b"], None, 0.0, torch.Generator().manual_seed(0))
    scored = [i for i, _ in decoded if i.grad is not None]
    assert scored and all(not clamp for _, clamp in decoded)
    images, grads = torch.cat([i.detach() for i in scored]), torch.cat([i.grad for i in scored])
    outside = (images < 0) | (images > 1)
    assert outside.any() and (grads[outside] != 0).all()


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_a_batch_in_one_call_equals_its_samples_one_at_a_time(kind):
    """The training step runs the batch in one modulated call per loss (every sample its own LoRA); summed over the
    samples run one at a time (what each of two torchrun ranks does with its row) the gradient is the same. In
    float64, where the two orders of the same arithmetic agree to ~1e-15; fp32 rounding alone moves the gradient of
    a trained toy model by ~3e-5 between the two (tests/test_distributed.py)."""
    from tiny import make_ha
    torch.set_default_dtype(torch.float64)
    try:
        pipe = tiny_pipe(kind, steps=3)
        for m in (pipe.backbone.model, pipe.vae):
            m.double()
        noise = pipe.noise
        pipe.noise = lambda n, g, device=None: noise(n, g, device).double()
        ha = make_ha(pipe, "S").double()
        with torch.no_grad():
            for p in ha.hypernet.decoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
        batch = {k: (v.double() if torch.is_tensor(v) else v) for k, v in next(prefs.stream(pref_pairs(), 2, 16)).items()}

        def grads(parts):
            ha.hypernet.zero_grad(set_to_none=True)
            for rows in parts:
                pref = {k: v[rows] for k, v in batch.items()}
                losses.training_step(ha, pipe, redness, ["a", "b"], pref, 1.0, torch.Generator().manual_seed(0), 0.0,
                                     "one-step", rows)
            return torch.cat([p.grad.flatten() for p in ha.hypernet.parameters() if p.grad is not None])
        together, apart = grads([slice(None)]), grads([slice(0, 1), slice(1, 2)]) / 2
        assert together.abs().sum() > 0 and rel_err(together, apart) < 1e-10
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_training_benchmark_runs():
    """benchmarks/bench_train.py on toy sizes on the CPU (--tiny): a line for each model with its time and memory
    fields. A smoke test, not a measurement: the script once broke unnoticed when the LoRA API changed."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--tiny", "--threads", "1"], cwd=root,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [ln.get("model") for ln in lines[1:]] == ["sd15", "flux"]
    assert all({"nograd_model_call_s", "train_step_s", "peak_gib"} <= set(ln) for ln in lines[1:])
