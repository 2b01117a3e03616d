"""What a user's commands can do to their files: the same actions against one checkout (a run of each, in a temporary
folder; ~5 min on 2 cores).

    python benchmarks/user_files.py REPO OUT.json [CASE-SUBSTRING]

Each case is one line of OUT.json: exit status, the last line on stderr, and whether the user's files survived.
benchmarks/results/user-files.json holds it for the checkout before the fix (a5faacd) and after; results.py renders it.
Every case is also a test (tests/test_user_files.py, tests/test_faults.py); this script is the measured before/after."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from test_faults import digest  # noqa: E402  (every file under a folder and its sha256, as the tests compare them)

REPO, OUT = sys.argv[1], sys.argv[2]
PY = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--steps", "1", "--batch-size", "1", "--no-eval", "--sample-steps", "4"]


def run(script, *args, timeout=600):
    p = subprocess.run([PY, script, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    last = (p.stderr.strip().splitlines() or [""])[-1][:160]
    return p.returncode, last


def user_folder(path):
    os.makedirs(os.path.join(path, "sub"))
    open(os.path.join(path, "paper.tex"), "w").write("\\section{Results}")
    open(os.path.join(path, "sub", "data.csv"), "w").write("1,2\n")


rows = []
tmp = tempfile.mkdtemp()
base = os.path.join(tmp, "finished")
rc, last = run("train.py", "--out", base, *TINY)
assert rc == 0, last


def case(name, fn):
    t = time.time()
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001
        got = {"outcome": f"harness error: {e!r}"[:200]}
    got.update(case=name, s=round(time.time() - t, 1))
    rows.append(got)
    print(json.dumps(got), flush=True)


def overwrite_user_folder():
    d = os.path.join(tmp, "thesis")
    user_folder(d)
    before = digest(d)
    rc, last = run("train.py", "--out", d, "--overwrite", *TINY)
    after = digest(d) if os.path.isdir(d) else {}
    lost = [k for k in before if after.get(k) != before[k]]
    return {"rc": rc, "user_files_lost": lost, "last_line": last}


def overwrite_run_with_notes():
    d = os.path.join(tmp, "notes-run")
    shutil.copytree(base, d)
    open(os.path.join(d, "notes.md"), "w").write("my notes")
    rc, last = run("train.py", "--out", d, "--overwrite", *TINY)
    return {"rc": rc, "notes_kept": os.path.exists(os.path.join(d, "notes.md")), "last_line": last}


def overwrite_with_bad_input():
    d = os.path.join(tmp, "bad-input")
    shutil.copytree(base, d)
    before = digest(d)
    rc, last = run("train.py", "--out", d, "--overwrite", *TINY, "--reward", "nosuchreward")
    return {"rc": rc, "old_run_whole": digest(d) == before if os.path.isdir(d) else False, "last_line": last}


def overwrite_with(*flags):
    def case():
        d = os.path.join(tmp, "bad-" + str(abs(hash(flags))))
        shutil.copytree(base, d)
        before = digest(d)
        fl = [bad_prefs() if f == "BAD" else f for f in flags]
        rc, last = run("train.py", "--out", d, "--overwrite", *TINY, *fl)
        return {"rc": rc, "old_run_whole": digest(d) == before if os.path.isdir(d) else False, "last_line": last}
    return case


def bad_prefs():
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = os.path.join(tmp, "bad.parquet")
    pq.write_table(pa.Table.from_pylist([{"caption": "a red circle", "jpg_0": b"not a jpeg", "jpg_1": b"neither",
                                          "label_0": 1.0, "label_1": 0.0}]), f)
    return f


def nan_lr():
    d = os.path.join(tmp, "nan-lr")
    rc, last = run("train.py", "--out", d, *TINY, "--lr", "nan")
    return {"rc": rc, "folder_created": os.path.exists(d), "last_line": last}


def two_writers():
    d = os.path.join(tmp, "two")
    ps = [subprocess.Popen([PY, "train.py", "--out", d, *TINY], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True) for _ in range(2)]
    out = [(p.wait(timeout=600), p.stderr.read().strip().splitlines()[-1:]) for p in ps]
    return {"rcs": [o[0] for o in out], "last_lines": [o[1][0][:160] if o[1] else "" for o in out]}


def sample_over_user_file():
    f = os.path.join(tmp, "holiday.png")
    open(f, "wb").write(b"my photo")
    rc, last = run("sample.py", "--hyper", base, "--prompt", "a red circle", "--steps", "4", "--out", f)
    return {"rc": rc, "user_file_kept": open(f, "rb").read() == b"my photo", "last_line": last}


def export_over_user_file():
    f = os.path.join(tmp, "mine.safetensors")
    open(f, "wb").write(b"my lora")
    rc, last = run("export_lora.py", "--hyper", base, "--prompt", "a red circle", "--out", f)
    return {"rc": rc, "user_file_kept": open(f, "rb").read() == b"my lora", "last_line": last}


def ctrl_c():
    d = os.path.join(tmp, "ctrl-c")
    p = subprocess.Popen([PY, "train.py", "--out", d, "--steps", "400", "--batch-size", "1", "--no-eval",
                          "--sample-steps", "4"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not os.path.exists(os.path.join(d, "metrics.jsonl")):
        time.sleep(1)
    time.sleep(8)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1].strip().splitlines()
    tb = any("Traceback" in line for line in err)
    tmpfiles = [k for k in (digest(d) if os.path.isdir(d) else {}) if ".tmp" in k or k.endswith("~")]
    return {"rc": p.returncode, "traceback": tb, "stderr_lines": len([e for e in err if "%|" not in e]),
            "last_line": (err[-1] if err else "")[:160], "temporary_files": tmpfiles}


for name, fn in [("--overwrite on a folder of the user's files", overwrite_user_folder),
                 ("--overwrite on a run holding the user's notes.md", overwrite_run_with_notes),
                 ("--overwrite with a bad --reward", overwrite_with_bad_input),
                 ("--overwrite with --reward toy-ir=nan", overwrite_with("--reward", "toy-ir=nan")),
                 ("--overwrite with --guidance nan", overwrite_with("--guidance", "nan")),
                 ("--overwrite with --seed 2**64", overwrite_with("--seed", str(2 ** 64))),
                 ("--overwrite with a preference file whose images are not images", overwrite_with("--prefs", "BAD")),
                 ("--lr nan", nan_lr),
                 ("two train.py into one new folder", two_writers),
                 ("sample.py --out onto an existing file", sample_over_user_file),
                 ("export_lora.py --out onto an existing file", export_over_user_file),
                 ("Ctrl-C during training", ctrl_c)]:
    if len(sys.argv) < 4 or sys.argv[3] in name:
        case(name, fn)
json.dump(rows, open(OUT, "w"), indent=1)
shutil.rmtree(tmp, ignore_errors=True)
