"""evaluate.py: the measures (saturation, diversity); one method measured (deterministic, every column); the toy
protocol's rows trained and scored on tiny pipelines into per-row JSON that results.py turns into tables; the paper's
Table 1 on a tiny random SD checkpoint with a tiny version of every reward of the paper's columns; bad arguments."""
import json
import os
from dataclasses import replace

import pytest
import torch
from tiny import pref_pairs, redness, tiny_pipe, train_run

import config
import evaluate as E
import protocol as P
import imagereward
import probe_tables
import results
import rewards
import scoring

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def test_saturation_of_pure_grey_and_black_background():
    img = torch.zeros(3, 3, 4, 4)
    img[0, 0] = 1.0                                          # pure red on black: saturation 1
    img[1] = 0.5                                             # grey: 0
    img[2, :, :2] = torch.tensor([1.0, 0.5, 0.5]).view(3, 1, 1)  # half pink (s = 0.5), half black (ignored)
    assert torch.allclose(scoring.saturation(img), torch.tensor([1.0, 0.0, 0.5]))


def test_diversity_is_zero_for_identical_seeds_and_one_for_orthogonal():
    same = torch.nn.functional.normalize(torch.randn(1, 5, 8), dim=-1).expand(3, 5, 8)
    assert scoring.diversity(same) == pytest.approx(0.0, abs=1e-6)
    ortho = torch.eye(3)[:, None, :].expand(3, 2, 3)       # seed s -> basis vector s, for both prompts
    assert scoring.diversity(ortho) == pytest.approx(1.0)


def test_measure_is_deterministic_and_fills_every_column():
    pipe = tiny_pipe("vp", steps=2)
    gen = scoring.sampler(pipe, lambda c: pipe.backbone)
    embed = lambda im: torch.nn.functional.normalize(im.flatten(1), dim=-1)  # noqa: E731
    m1, im1 = scoring.measure(gen, pipe, PROMPTS, [0, 1], redness, None, embed, batch=2, per_image=True)
    m2, im2 = scoring.measure(gen, pipe, PROMPTS, [0, 1], redness, None, embed, batch=2)
    assert im1.shape == (2, 3, 3, 16, 16) and torch.equal(im1, im2)
    assert set(m1) == {"reward/reward", "diversity", "saturation", "sec_per_image", "per_image"}
    assert m1["per_image"]["reward/reward"] == pytest.approx(redness(im1.flatten(0, 1), PROMPTS * 2).tolist())
    assert m1["reward/reward"] == pytest.approx(sum(m1["per_image"]["reward/reward"]) / 6) and m1["diversity"] > 0
    # the same x_T for every method (at one batch size): a second generator of the base model gives the same samples
    again = scoring.measure(scoring.sampler(pipe, lambda c: pipe.backbone), pipe, PROMPTS, [0], redness, batch=2)[1]
    assert torch.equal(again, im1[:1])


def test_toy_protocol_rows_json_and_tables(tmp_path, monkeypatch, capsys):
    """Two training seeds of two trained rows and two untrained rows on a tiny pipeline, scored on a few prompts:
    one JSON per row with a figure per training seed, and results.py's table with a t-interval over seeds."""
    pipe = tiny_pipe("vp", steps=2)
    a = P.Protocol(train_seeds=(0, 1), sample_seeds=2, heldout_seeds=1, n_prompts=3, out=str(tmp_path / "runs"),
                   results=str(tmp_path / "res"))
    monkeypatch.setattr(P, "SCORE", "red")
    monkeypatch.setitem(config.REWARDS, "red", lambda path, **kw: RedReward())
    monkeypatch.setattr(config, "load_prefs", lambda cfg, train, held: pref_pairs())
    monkeypatch.setattr(P.world, "SIZE", 16)
    rows = [r for r in P.ROWS if r.name in ("base", "HyperAlign-I", "static LoRA", "Best-of-8",
                                            "HyperAlign-I, LoRA averaged")]
    monkeypatch.setattr(P, "PROBE", (2, (5,)))
    base = config.RunConfig.from_preset
    monkeypatch.setattr(config.RunConfig, "from_preset",
                        classmethod(lambda cls, name, **kw: base(name, **{**kw, "steps": 2, "batch_size": 2,
                                                                           "reward": "red"})))
    monkeypatch.setattr(P.runs, "adaptivity", lambda method, pipe, prompts: {"x_T": 0.5})
    recs = {}
    for row in rows:
        rec = P.run_row(row, "toy-sd", pipe, a, P.Rewards())
        recs[row.name] = rec
        os.makedirs(os.path.join(a.results, "toy-sd"), exist_ok=True)
        json.dump(rec, open(os.path.join(a.results, "toy-sd", f"{row.slug}.json"), "w"))
    assert list(recs["HyperAlign-I"]["seeds"]) == ["0", "1"] and list(recs["base"]["seeds"]) == ["-"]
    assert {"unseen", "heldout", "adaptivity", "train_s"} <= set(recs["HyperAlign-I"]["seeds"]["0"])
    assert os.path.isdir(os.path.join(a.out, "toy-sd", "hyperalign-i-s1"))
    averaged = recs["HyperAlign-I, LoRA averaged"]                  # HyperAlign-I's own runs, not new ones
    assert list(averaged["seeds"]) == ["0", "1"] and "train_s" not in averaged["seeds"]["0"]
    assert not any("averaged" in d for d in os.listdir(os.path.join(a.out, "toy-sd")))
    blocks = results.blocks(a.results)
    lines = blocks["toy-sd-unseen"].splitlines()
    row = next(ln for ln in lines if ln.startswith("| HyperAlign-I |"))
    vals = [s["unseen"]["reward/red"] for s in recs["HyperAlign-I"]["seeds"].values()]
    mean, half = scoring.t_interval(vals)
    assert f"{mean:.3f} ± {half:.3f}" in row and "| 2 |" in row
    assert "| HyperAlign-I − static LoRA |" in blocks["toy-sd-claims"]
    assert "| HyperAlign-I − HyperAlign-I, LoRA averaged |" in blocks["toy-sd-claims"]
    # benchmarks/time_rows.py: a row's generator from its finished run as it is (nothing trained, a missing run
    # refused); its timing.json gives the cost columns
    hyper = rows[1]
    assert P.generator(hyper, "toy-sd", pipe, P.Rewards(), P.row_config(hyper, "toy-sd", a, 0), reuse_only=True)[2] == 0
    with pytest.raises(ValueError, match="no such run folder"):
        P.generator(hyper, "toy-sd", pipe, P.Rewards(), P.row_config(hyper, "toy-sd", a, 7), reuse_only=True)
    with open(os.path.join(a.results, "toy-sd", "timing.json"), "w") as f:
        json.dump({"sec_per_image": {"base": 0.5, "HyperAlign-I": 0.55}}, f)
    lines = results.blocks(a.results)["toy-sd-unseen"].splitlines()
    row = next(ln for ln in lines if ln.startswith("| HyperAlign-I |"))
    assert row.endswith("| 0.550 | 1.1 |")
    # a finished run with the row's settings is reused; with other settings it is trained again, and said so
    cfg = P.row_config(hyper, "toy-sd", a, 0)
    capsys.readouterr()
    P.generator(hyper, "toy-sd", pipe, P.Rewards(), cfg)
    assert "not reused" not in capsys.readouterr().out
    P.generator(hyper, "toy-sd", pipe, P.Rewards(), replace(cfg, lr=cfg.lr / 2))
    assert f"{cfg.out}: not reused, training it again" in capsys.readouterr().out


def test_learning_rate_search_on_another_toy_model(tmp_path, monkeypatch):
    """protocol.lr_search: each method trained at every learning rate of the grid on 'val', one chosen per method by
    the search's rule, search-MODEL.json written and rendered by results.py."""
    pipe = tiny_pipe("flow", steps=2)
    monkeypatch.setattr(P, "SCORE", "red")
    monkeypatch.setitem(config.REWARDS, "red", lambda path, **kw: RedReward())
    monkeypatch.setattr(config, "load_prefs", lambda cfg, train, held: pref_pairs())
    monkeypatch.setattr(config, "load_pipeline", lambda cfg, device=None: pipe)
    monkeypatch.setattr(P.world, "prompts", lambda split: PROMPTS)
    monkeypatch.setattr(P.world, "SIZE", 16)
    monkeypatch.setattr(P, "SEARCH_LR", [1e-4, 1e-3])
    monkeypatch.setattr(P.runs, "adaptivity", lambda method, pipe, prompts: {"x_T": 0.5})
    base = config.RunConfig.from_preset
    monkeypatch.setattr(config.RunConfig, "from_preset",
                        classmethod(lambda cls, name, **kw: base(name, **{**kw, "steps": 2, "batch_size": 2,
                                                                           "reward": "red"})))
    a = P.Protocol(out=str(tmp_path / "runs"), results=str(tmp_path / "res"))
    os.makedirs(a.results)
    record = P.lr_search(a, P.Rewards(), "toy-flux")
    assert [(r["method"], r["setting"]["lr"]) for r in record["runs"]] == [
        ("HyperAlign-I", 1e-4), ("HyperAlign-I", 1e-3), ("static LoRA", 1e-4), ("static LoRA", 1e-3)]
    assert sum(bool(r.get("chosen")) for r in record["runs"]) == 2 and set(record["chosen"]) == {
        "HyperAlign-I", "static LoRA"}
    assert os.path.isdir(os.path.join(a.out, "search-toy-flux", "static-0.001"))
    assert "| 2 | static LoRA |" in results.blocks(a.results)["search-toy-flux"]


class RedReward(rewards.Reward):
    def forward(self, images, prompts):
        return redness(images, prompts)


@pytest.mark.slow
def test_paper_table_on_a_tiny_random_sd_checkpoint(tmp_path, monkeypatch, capsys):
    """`evaluate.py --model PATH`: base and a HyperAlign run on a tiny random SD folder, scored by tiny random versions
    of all five of the paper's rewards; table.md has every column, finite, and the time per image."""
    from sd_tiny import write_pipeline
    from test_imagereward import TH, VH, checkpoint, write_bert_tokenizer
    from test_rewards import HEADS, write_files
    from tiny import run_cfg

    write_pipeline(str(tmp_path / "sd"))
    f = write_files(tmp_path / "rw")
    torch.save(checkpoint(), tmp_path / "ImageReward.pt")
    write_bert_tokenizer(tmp_path / "bert")
    monkeypatch.setitem(config.REWARDS, "hps", lambda path, tokenizer=None, device=None, dtype=None: rewards.load_hps(
        path, tokenizer, device, dtype, vision_heads=HEADS, text_heads=HEADS))
    monkeypatch.setitem(config.REWARDS, "imagereward", lambda path, tokenizer=None, device=None, dtype=None:
                        imagereward.load(path, str(tmp_path / "bert"), device, dtype, VH, TH))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\nthe dog\na cat and a dog\n")
    cfg = run_cfg(tmp_path / "run", tmp_path, model=str(tmp_path / "sd"), hyper="toy-sd", steps=1, no_eval=True,
                  prompts=str(prompts), lambda_reg=0.0, reward=f"clip:{f['root'] / 'clip'}", sample_steps=2)
    train_run("hyperalign", cfg)
    score = (f"aesthetic:{f['root'] / 'clip'}+{f['root'] / 'mlp.pth'},pick:{f['root'] / 'clip'},"
             f"imagereward:{tmp_path / 'ImageReward.pt'},clip:{f['root'] / 'clip'},hps:{f['root'] / 'hps.pt'}")
    E.main(["--model", str(tmp_path / "sd"), "--score", score, "--reward-tokenizer", f["tok"], "--prompts",
            str(prompts), "--hyper", str(tmp_path / "run"), "--sample-steps", "2", "--sample-seeds", "2",
            "--out", str(tmp_path / "table"), "--bon", "2"])
    table = json.load(open(tmp_path / "table" / "table.json"))["rows"]
    assert list(table) == ["base", "HyperAlign-I (run)", "Best-of-2"]
    for row in table.values():
        assert {"aesthetic", "pick", "imagereward", "clip", "hps", "sec_per_image"} <= set(row)
        assert all(torch.isfinite(torch.tensor([v["mean"], v["ci95"]])).all() for k, v in row.items()
                   if k != "sec_per_image") and row["sec_per_image"] > 0
    md = open(tmp_path / "table" / "table.md").read()
    assert "| Method | Aesthetic ↑ | PickScore ↑ | ImageReward ↑ | CLIP ↑ | HPS ↑ | Time (s) ↓ |" in md


def test_bad_arguments_exit_2(capsys):
    for bad in (["--train-seeds", "x"], ["--sample-seeds", "0"], ["--rows", "nosuch"], ["--model", "m"],
                ["--search-part", "2/2"], ["--search-part", "x"]):
        with pytest.raises(SystemExit) as e:
            E.main(bad)
        assert e.value.code == 2, bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


def test_every_row_has_its_own_files():
    """Each row's slug names its JSON and run folders: two rows with one slug would overwrite each other."""
    slugs = [r.slug for r in P.ROWS]
    assert len(set(slugs)) == len(slugs), slugs


def test_probe_tables_from_known_rows():
    """probe_tables.py: the t-interval over seeds per (task, method, steps), in-sample cells naming how
    many seeds they hold, and each method's share of the oracle's gain paired by seed and rank."""
    def row(method, seed, left, right, **kw):
        return {"task": "opposite", "method": method, "seed": seed, "steps": 150,
                "gain": {"left of": left, "right of": right}, **kw}
    p = {"rows": [row("oracle: a LoRA per relation", 0, 0.2, 0.2), row("oracle: a LoRA per relation", 1, 0.4, 0.4),
                  row("HyperAlign-I", 0, 0.1, 0.1, gain_in_sample={"left of": 0.5, "right of": 0.5}),
                  row("HyperAlign-I", 1, 0.1, 0.1), row("HyperAlign-I", 0, 9.0, 9.0, head_gain=1.0)]}
    table = probe_tables.probe_table(p)
    assert "| opposite | HyperAlign-I | 150 | 2 | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.500 (1 seed) |" in table
    assert "| opposite | HyperAlign-I, head gain 1 | 150 | 1 | 9.000 |" in table
    shares = probe_tables.probe_share_table(p).splitlines()
    mean, half = scoring.t_interval([0.1 / 0.2, 0.1 / 0.4])
    assert shares[2] == f"| 4 | HyperAlign-I | 2 | 0.300 ± {scoring.t_interval([0.2, 0.4])[1]:.3f} | 0.100 ± 0.000 | " \
                        f"{mean:.2f} ± {half:.2f} |" and len(shares) == 3               # the head-gain run left out
