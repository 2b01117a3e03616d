"""Nothing a user types destroys their files: --overwrite replaces only a run of ours and only after every input was
checked, a run folder is locked while it is written, no script overwrites a file unless told to or writes inside a
run's checkpoint, every number is checked before anything is created, and Ctrl-C leaves one line and whole files."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load as load_st
from safetensors.torch import save as save_st
from test_faults import ROOT, digest, exit_2, train_tiny
from tiny import pref_pairs, prompt_file, redness, run_cfg, tiny_pipe, train_run

import analysis
import config
import evaluate
import export_lora
import losses
import rundir
import runs
import sample
import train
from toy import world


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """A finished tiny run whose folder the cases below try to damage."""
    tmp = tmp_path_factory.mktemp("old")
    train_tiny(tmp / "run", tmp, steps=2)
    return tmp / "run"


def copy_of(run, tmp_path, name="run"):
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------------------------------------------- --overwrite

def test_overwrite_refuses_a_folder_of_someone_elses_files(tmp_path, capsys):
    mine = tmp_path / "thesis"
    (mine / "sub").mkdir(parents=True)
    (mine / "paper.tex").write_text("\\section{Results}")
    (mine / "sub" / "data.csv").write_text("1,2\n")
    before = digest(mine)
    exit_2(train.main, ["--out", str(mine), "--overwrite", "--steps", "1"], capsys, "--overwrite", "paper.tex",
           "sub/", "refusing to delete")
    assert digest(mine) == before


def test_overwrite_refuses_a_run_with_a_foreign_file_in_it(old_run, tmp_path, capsys):
    run = copy_of(old_run, tmp_path)
    (run / "notes.md").write_text("my notes")
    (run / "ckpt-000002" / "extra.bin").write_bytes(b"x")
    before = digest(run)
    exit_2(train.main, ["--out", str(run), "--overwrite", "--steps", "1"], capsys, "notes.md",
           os.path.join("ckpt-000002", "extra.bin"))
    assert digest(run) == before


@pytest.mark.parametrize("flags, culprit", [
    (["--prefs", "BAD"], "row 0"),                           # read lazily: the first record is read before anything
    (["--reward", "toy-ir=nan"], "not finite"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--guidance", "nan"], "--guidance"),
    (["--lambda-reg", "nan"], "--lambda-reg"),
    (["--lr", "inf"], "--lr"),
    (["--reward", "hps:"], "--reward"),
])
def test_overwrite_with_a_bad_input_leaves_the_old_run_whole(old_run, tmp_path, capsys, flags, culprit):
    import pyarrow as pa
    import pyarrow.parquet as pq
    bad = tmp_path / "bad.parquet"                           # the right columns, an image that is not one
    pq.write_table(pa.Table.from_pylist([{"caption": "a red circle", "jpg_0": b"not a jpeg", "jpg_1": b"neither",
                                          "label_0": 1.0, "label_1": 0.0}]), bad)
    run = copy_of(old_run, tmp_path)
    before = digest(run)
    flags = [str(bad) if f == "BAD" else f for f in flags]
    exit_2(train.main, ["--out", str(run), "--overwrite", "--steps", "1", *flags], capsys, culprit)
    assert digest(run) == before and rundir.load(str(run))[2] == 2


def test_overwrite_replaces_a_run_of_ours(old_run, tmp_path):
    run = copy_of(old_run, tmp_path)
    train_run("hyperalign", run_cfg(run, tmp_path, steps=1, no_eval=True), overwrite=True, pipe=tiny_pipe("vp"),
               reward=redness, prefs_reader=pref_pairs())
    assert rundir.load(str(run))[2] == 1 and not os.path.isdir(run / "ckpt-000002")


# ---------------------------------------------------------------------------------------------------------- locks

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
import rundir
rundir.lock_folder(sys.argv[1], False, False)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    script = tmp_path / "holder.py"
    script.write_text(HOLDER.format(root=ROOT))
    holder = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunError, match=rf"being written by another process \(PID {holder.pid}"):
            train_tiny(out, tmp_path, steps=1)
        assert not os.path.exists(out / "config.json")          # the second writer wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".lock").read_text().strip() == str(holder.pid)   # a stale lock file of a dead process ...
    train_tiny(out, tmp_path, steps=1)                               # ... holds no lock: the folder is taken over
    assert rundir.load(str(out))[2] == 1 and (out / ".lock").read_text().strip() == str(os.getpid())


def test_two_runs_into_one_new_folder_one_wins_and_the_other_writes_nothing(tmp_path):
    """Both pass the early check (the folder is new); the lock decides at the first write."""
    out = tmp_path / "run"
    rundir.check_folder(str(out), False, False)                           # what the second process saw
    train_tiny(out, tmp_path, steps=1)                             # the first one runs
    rundir.unlock_folder(str(out))
    with pytest.raises(rundir.RunError, match="already holds a run"):
        rundir.create(str(out), False, {"method": "hyperalign"})     # the second is refused under the lock
    assert rundir.load(str(out))[2] == 1


# --------------------------------------------------------------------------------------------- scripts that write

def test_no_script_overwrites_a_file_unless_told_to_and_none_writes_into_a_checkpoint(old_run, tmp_path, capsys):
    run = copy_of(old_run, tmp_path)
    ckpt_weights = run / "ckpt-000002" / "weights.safetensors"
    before = digest(run)
    for target in (ckpt_weights, run / "ckpt-000002" / "new.safetensors", run / "config.json"):
        for over in ([], ["--overwrite"]):
            exit_2(export_lora.main, ["--hyper", str(run), "--prompt", "a red circle", "--out", str(target), *over],
                   capsys, str(target))
    assert digest(run) == before
    existing = tmp_path / "x.png"
    existing.write_bytes(b"someone's picture")
    exit_2(sample.main, ["--model", world.SD_DIR, "--prompt", "a red circle", "--out", str(existing)], capsys,
           "already exists", "--overwrite")
    exit_2(sample.main, ["--model", world.SD_DIR, "--prompt", "a red circle", "--out", str(run / "samples.png"),
                         "--overwrite"], capsys, "a file of the run")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "analysis.json").write_text("{}")
    exit_2(analysis.main, ["--hyper", str(run), "--out", str(tmp_path / "figs")], capsys, "analysis.json",
           "--overwrite")
    assert existing.read_bytes() == b"someone's picture"


def test_an_export_is_not_overwritten_silently(tmp_path, capsys):
    """export_lora.py onto its own earlier export: refused without --overwrite, replaced with it."""
    from test_export import make_run
    run = make_run(tmp_path / "run", world.SD_DIR, "toy-sd", steps=3)
    out = tmp_path / "lora.safetensors"
    args = ["--hyper", run, "--prompt", "a red circle left of a blue square", "--out", str(out)]
    assert export_lora.main(args) == 0
    first = out.read_bytes()
    exit_2(export_lora.main, args, capsys, "already exists")
    assert out.read_bytes() == first
    assert export_lora.main([*args, "--overwrite"]) == 0


def test_evaluate_refuses_real_checkpoint_flags_without_a_model(tmp_path, capsys):
    results = tmp_path / "results"
    exit_2(evaluate.main, ["--hyper", str(tmp_path), "--prompts", prompt_file(tmp_path), "--results", str(results),
                           "--out", str(tmp_path / "o")], capsys, "--prompts", "--hyper", "--model")
    exit_2(evaluate.main, ["--model", world.SD_DIR, "--score", "toy-pref", "--prompts", "toy:unseen",
                           "--guidance", "nan"], capsys, "--guidance")
    assert not results.exists()
    (results / "toy-sd").mkdir(parents=True)
    (results / "toy-sd" / "base.json").write_text("{}")
    exit_2(evaluate.main, ["--rows", "base", "--models", "toy-sd", "--results", str(results), "--out",
                           str(tmp_path / "o")], capsys, "base.json", "--overwrite")
    assert (results / "toy-sd" / "base.json").read_text() == "{}"


# ----------------------------------------------------------------------------------------------- what is honoured

def test_an_edited_config_json_is_refused(old_run, tmp_path, capsys):
    run = copy_of(old_run, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    saved["hyper"]["alpha"] = 40.0                              # ten times the LoRA scale, silently
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(rundir.RunError, match="config.json does not match checkpoint.json"):
        runs.load_trained(str(run), tiny_pipe("vp").backbone)
    with pytest.raises(rundir.RunError, match="config.json does not match"):
        train_tiny(run, old_run.parent, resume=True, steps=3)


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa red circle\na blue square\n".encode("utf-8"))
    assert config.read_prompts(str(path)) == ["a red circle", "a blue square"]


def test_resuming_from_non_finite_weights_with_matching_digests_blames_the_file(old_run, tmp_path):
    import hashlib
    run = copy_of(old_run, tmp_path)
    path = run / "ckpt-000002" / "weights.safetensors"
    sd = load_st(path.read_bytes())
    k = next(iter(sd))
    sd[k] = torch.full_like(sd[k], float("nan"))
    data = save_st(sd, metadata={"step": "2"})
    path.write_bytes(data)
    pointer = json.loads((run / "checkpoint.json").read_text())
    pointer["sha256"]["weights.safetensors"] = hashlib.sha256(data).hexdigest()
    (run / "checkpoint.json").write_text(json.dumps(pointer))
    with pytest.raises(rundir.RunError, match="non-finite weights .*which no run of ours writes"):
        train_tiny(run, old_run.parent, resume=True, steps=3)


# -------------------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_ends_in_one_line_and_leaves_whole_files(tmp_path, capsys, monkeypatch):
    real, calls = losses.training_step, {"n": 0}

    def interrupted(*args, **kw):              # Ctrl-C in the third step, after the step-2 checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(losses, "training_step", interrupted)
    out = tmp_path / "run"
    cfg = run_cfg(out, tmp_path, steps=4, no_eval=True)
    code = config.cli(lambda: train_run("hyperalign", cfg, pipe=tiny_pipe("vp"), reward=redness,
                                         prefs_reader=pref_pairs()))
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("HyperAlign-I:")]  # tqdm
    assert code == 130 and len(err) == 1 and "step 2" in err[0] and "--resume" in err[0], err
    assert rundir.load(str(out))[2] == 2 and not [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
    monkeypatch.setattr(losses, "training_step", real)
    train_tiny(out, tmp_path, resume=True, steps=4)               # and it resumes
    assert rundir.load(str(out))[2] == 4


def test_ctrl_c_inside_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import files
    real = os.fsync

    def fsync(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        files.write_text(str(tmp_path / "a.json"), "{}")
    monkeypatch.setattr(os, "fsync", real)
    assert os.listdir(tmp_path) == []
