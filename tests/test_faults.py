"""Runs that cannot lose work: a kill during a save, a full disk at every write, a torn checkpoint, exploding weights, a
second run into a used folder; and every kind of bad input ends in one line naming the culprit, exit 2."""
import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from tiny import pref_pairs, redness, run_cfg, tiny_pipe, train_run

import analysis
import baselines
import config
import evaluate
import files
import rundir
import sample
import train
from toy import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_tiny(out, tmp_path, resume=False, **kw):
    return train_run("hyperalign", run_cfg(out, tmp_path, **{"no_eval": True, **kw}), resume,
                      pipe=tiny_pipe("vp"), reward=redness, prefs_reader=pref_pairs())


def digest(folder) -> dict:
    """Every file under `folder` and the sha256 of its bytes."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def same_weights(a, b) -> bool:
    wa, wb = rundir.load(str(a))[0], rundir.load(str(b))[0]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run, and a copy of the same run stopped at its step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("ref")
    train_tiny(tmp / "full", tmp, steps=4, variant="P")
    train_tiny(tmp / "half", tmp, steps=2, variant="P")
    return tmp


# ------------------------------------------------------------------------------------------------------ checkpoints

KILLER = f"""
import os, signal, sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
import pathlib
import files
from tiny import pref_pairs, redness, run_cfg, tiny_pipe, train_run
out, tmp = sys.argv[1], pathlib.Path(sys.argv[2])
real = files.write_bytes
def write_bytes(path, data):          # die like kill -9 in the middle of the step-4 checkpoint (weights written)
    if path.endswith(os.path.join("ckpt-000004", "optim.pt")):
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, data)
files.write_bytes = write_bytes
train_run("hyperalign", run_cfg(out, tmp, steps=4, variant="P", no_eval=True), True, pipe=tiny_pipe("vp"),
           reward=redness, prefs_reader=pref_pairs())
"""


def test_kill_9_during_a_save_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    out = tmp_path / "killed"
    shutil.copytree(reference / "half", out)
    (tmp_path / "killer.py").write_text(KILLER)
    r = subprocess.run([sys.executable, str(tmp_path / "killer.py"), str(out), str(reference)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -9, r.stderr[-2000:]                                  # killed mid-save
    assert os.path.isfile(out / "ckpt-000004" / "weights.safetensors")           # the new step half written ...
    assert rundir.load(str(out))[2] == 2                                           # ... the pointer still at step 2
    train_tiny(out, reference, resume=True, steps=4, variant="P")
    assert same_weights(out, reference / "full")
    assert [json.loads(ln)["step"] for ln in open(out / "metrics.jsonl")] == [1, 2, 3, 4]


def test_a_full_disk_at_each_write_in_turn_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch):
    """OSError(ENOSPC) at the n-th fsync (every write of the resumed run, one after another): one clear error, no
    temporary file left, the folder still loads a whole checkpoint, and resuming then equals the uninterrupted run."""
    n, failed = 0, 0
    real = os.fsync
    while True:
        n += 1
        out = tmp_path / f"disk{n}"
        shutil.copytree(reference / "half", out)
        calls = {"n": 0}

        def fsync(fd, n=n, calls=calls):          # count the files' fsyncs (a folder's is best effort)
            calls["n"] += stat.S_ISREG(os.fstat(fd).st_mode)
            if calls["n"] == n and stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
        try:
            train_tiny(out, reference, resume=True, steps=4, variant="P", no_eval=False)
            done = True
        except files.FileError as e:
            assert "No space left on device" in str(e) and str(out) in str(e)
            failed, done = failed + 1, False
        monkeypatch.setattr(os, "fsync", real)
        assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
        assert rundir.load(str(out))[2] in (2, 4)                                  # a whole checkpoint, whichever
        if done:
            break
        train_tiny(out, reference, resume=True, steps=4, variant="P")
        assert same_weights(out, reference / "full"), n
    # every write was hit once: the log rewritten on resume, its 2 lines, the 3 files of the step-4 checkpoint,
    # metrics.json, samples.png
    assert failed == 8


def test_a_torn_or_edited_checkpoint_is_refused(reference, tmp_path):
    for name in ("weights.safetensors", "optim.pt"):
        out = tmp_path / name
        shutil.copytree(reference / "full", out)
        path = out / "ckpt-000004" / name
        path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
        with pytest.raises(rundir.RunError, match=f"ckpt-000004/{name} does not match checkpoint.json"):
            rundir.load(str(out))
    out = tmp_path / "swapped"                                    # a whole set, but another run's file in it
    shutil.copytree(reference / "full", out)
    shutil.copy(reference / "half" / "ckpt-000002" / "optim.pt", out / "ckpt-000004" / "optim.pt")
    with pytest.raises(rundir.RunError, match="torn or edited"):
        rundir.load(str(out))


def test_exploding_weights_stop_with_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="non-finite values at step .*last good checkpoint"):
        train_tiny(tmp_path / "r", tmp_path, steps=6, lr=1e30, save_every=1)
    weights, _, step = rundir.load(str(tmp_path / "r"))
    assert step < 6 and all(torch.isfinite(v).all() for v in weights.values())


def test_a_second_run_into_a_run_folder_is_refused_and_the_folder_unchanged(reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference / "full", out)
    before = digest(out)
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--steps", "5", "--prefs", str(tmp_path / "bad.parquet")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "already holds a run" in err[0] and "--resume" in err[0]
    assert digest(out) == before
    with pytest.raises(rundir.RunError, match="--resume and --overwrite"):
        rundir.check_folder(str(out), True, True)


def test_resume_with_changed_settings_is_refused_listing_them(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference / "half", out)
    with pytest.raises(rundir.RunError, match=r"--lr 0.01 -> 0.5.*--seed 0 -> 3"):
        train_tiny(out, reference, resume=True, steps=4, variant="P", lr=0.5, seed=3)
    with pytest.raises(rundir.RunError, match="global batch 2 -> 4"):
        train_tiny(out, reference, resume=True, steps=4, variant="P", batch_size=4)


# -------------------------------------------------------------------------------------------------------- bad input

def exit_2(main, argv, capsys, *culprits):
    """main(argv) ends in exit status 2 with one line `error: ...` naming every culprit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (argv, err)
    for c in culprits:
        assert str(c) in err[0], (c, err[0])
    return err[0]


def corrupt_copy(reference, tmp_path, name, tag="") -> str:
    out = tmp_path / f"corrupt-{name}{tag}"
    shutil.copytree(reference / "full", out)
    path = out / "ckpt-000004" / name
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return str(out)


def test_corrupt_checkpoints_in_every_script(reference, tmp_path, capsys):
    for name in ("weights.safetensors", "optim.pt"):
        out = corrupt_copy(reference, tmp_path, name)
        exit_2(train.main, ["--out", out, "--resume", "--steps", "4"], capsys, name)
    out = corrupt_copy(reference, tmp_path, "weights.safetensors", "-2")
    run_cfg_file = os.path.join(out, "config.json")
    saved = json.load(open(run_cfg_file))
    saved["run"]["model"] = world.SD_DIR                                          # sample / analysis need a model
    json.dump(saved, open(run_cfg_file, "w"))
    exit_2(sample.main, ["--hyper", out, "--prompt", "a red circle", "--out", str(tmp_path / "x.png"),
                         "--device", "cpu"], capsys, "weights.safetensors")
    exit_2(analysis.main, ["--hyper", out, "--out", str(tmp_path / "fig")], capsys, "weights.safetensors")
    exit_2(evaluate.main, ["--model", world.SD_DIR, "--score", "toy-pref", "--prompts", "toy:unseen",
                               "--hyper", out, "--out", str(tmp_path / "t")], capsys, "weights.safetensors")


@pytest.mark.parametrize("content, culprit", [("[]", "expected a JSON object"),
                                              ('{"_class_name": "UNet2DConditionModel"}', "missing block_out_channels"),
                                              (None, "heads"), (b"\xff\xfe{", "not a readable JSON file")])
def test_model_configs_that_parse_but_describe_no_model(tmp_path, capsys, content, culprit):
    folder = tmp_path / "sd"
    shutil.copytree(world.SD_DIR, folder)
    path = folder / "unet" / "config.json"
    if content is None:                                                           # 0 attention heads
        cfg = json.load(open(path))
        cfg["attention_head_dim"] = 0
        content = json.dumps(cfg)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    exit_2(sample.main, ["--model", str(folder), "--prompt", "x", "--out", str(tmp_path / "x.png"), "--device", "cpu"],
           capsys, path, culprit)


def test_text_encoders_truncated_mis_shaped_or_without_config(tmp_path, capsys):
    argv = ["--prompt", "x", "--out", str(tmp_path / "x.png"), "--device", "cpu", "--steps", "1"]
    for sub, edit, culprit in (("text_encoder_2", "truncate", "truncated or corrupt"),
                               ("text_encoder_2", "misshape", "mis-shaped"),
                               ("text_encoder", "no-config", "no config.json")):
        folder = tmp_path / f"flux-{edit}"
        shutil.copytree(world.FLUX_DIR, folder)
        weights_file = folder / sub / "model.safetensors"
        if edit == "truncate":
            weights_file.write_bytes(weights_file.read_bytes()[:-100])
        elif edit == "misshape":
            from safetensors.torch import load_file, save_file
            sd = load_file(str(weights_file))
            k = next(k for k in sd if k.endswith("final_layer_norm.weight"))
            sd[k] = torch.zeros(3)
            save_file(sd, str(weights_file))
        else:
            os.remove(folder / sub / "config.json")
        exit_2(sample.main, ["--model", str(folder), *argv], capsys, sub, culprit)


def test_no_cuda_and_bad_out_folders(tmp_path, capsys):
    if not torch.cuda.is_available():
        for main in (train.main, baselines.main):
            exit_2(main, ["--device", "cuda", "--out", str(tmp_path / "r")], capsys, "--device cuda")
        exit_2(evaluate.main, ["--device", "cuda"], capsys, "--device cuda")
    (tmp_path / "file").write_text("x")
    exit_2(train.main, ["--out", str(tmp_path / "file")], capsys, "is a file")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    if not os.access(locked, os.W_OK):                                            # (root can write anywhere)
        exit_2(train.main, ["--out", str(locked / "r")], capsys, "not writable")


def test_inputs_are_honoured_or_refused(tmp_path, capsys, monkeypatch):
    # toy model + --prompts that do not exist: refused, not replaced by the toy split
    exit_2(train.main, ["--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r")], capsys, "none.txt")
    # a real model without held-out prompts: refused, not scored on its training prompts
    (tmp_path / "p.txt").write_text("a cat\n")
    exit_2(train.main, ["--preset", "sd15", "--model", world.SD_DIR, "--reward", "toy-pref", "--prompts",
                        str(tmp_path / "p.txt"), "--prefs", world.PREFS_PATH, "--out", str(tmp_path / "r")], capsys,
           "--eval-prompts")
    # baselines.py honours --tokenizer (it reaches the loader)
    seen = {}
    monkeypatch.setattr(config, "load_pipeline", lambda cfg, device=None: seen.update(tok=cfg.tokenizer) or
                        (_ for _ in ()).throw(ValueError("stop here")))
    exit_2(baselines.main, ["--tokenizer", "TOKDIR", "--out", str(tmp_path / "b")], capsys, "stop here")
    assert seen["tok"] == "TOKDIR"


def test_toy_rewards_need_no_toy_model():
    """toy-pref / toy-clip are in the reward table whatever --model is (no import side effects)."""
    cfg = config.RunConfig(model=os.path.join(ROOT, "assets", "toy", "sd"), reward="toy-pref,toy-clip")
    r = config.load_reward(cfg.reward)
    assert list(r.rewards) == ["toy-pref", "toy-clip"]
