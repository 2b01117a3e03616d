"""Seconds per image of every row of the toy tables, measured alone: the tables' `s / image` and `× base` columns.

The protocol (evaluate.py) times each row while it trains and scores the rows, often as two jobs on the two cores, so
its times are not cost figures. This script re-times every row of one toy model on the code as it is: the row's
generator exactly as the protocol builds it (protocol.generator; trained rows from their finished run folders of
training seed 0, never retrained), the protocol's first timed batch (the first 16 'unseen' prompts, x_T from seed 0),
`--reps` rounds with the rows interleaved (load on the machine falls on each alike), the fastest round per row.

    python benchmarks/time_rows.py --model toy-sd [--reps 5] [--threads 1]

Writes docs/results/MODEL/timing.json, which results.py reads for those two columns (where it is absent: the
protocol's own times).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import config  # noqa: E402
import files  # noqa: E402
import protocol  # noqa: E402
from toy import world  # noqa: E402

BATCH = 16


def time_rows(model: str, p: protocol.Protocol, reps: int) -> dict[str, float]:
    """{row name: seconds per image} for every row of `model` that has a results JSON (the rows of its table)."""
    rewards = protocol.Rewards()
    pipe = config.load_pipeline(protocol.RunConfig.from_preset(model))
    rows = [r for r in protocol.ROWS
            if model in r.models and os.path.isfile(os.path.join(p.results, model, f"{r.slug}.json"))]
    gens = {}
    for row in rows:
        cfg = None if row.kind in protocol.UNTRAINED else protocol.row_config(row, model, p, p.train_seeds[0])
        gens[row.name] = protocol.generator(row, model, pipe, rewards, cfg, reuse_only=True)[0]
    prompts = world.eval_prompts("unseen", p.n_prompts)[:BATCH]
    x_T = pipe.noise(len(prompts), torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in gens}
    with torch.no_grad():
        for r in range(reps + 1):                                   # round 0 warms up
            for name, generate in gens.items():
                t0 = time.perf_counter()
                generate(prompts, x_T, 0)
                if r:
                    times[name].append((time.perf_counter() - t0) / len(prompts))
            if r:
                print(f"round {r}/{reps}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()), flush=True)
    return {name: min(v) for name, v in times.items()}


def write(model: str, p: protocol.Protocol, reps: int, threads: int) -> None:
    times = time_rows(model, p, reps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    path = os.path.join(p.results, model, "timing.json")
    files.write_json(path, {"model": model, "sec_per_image": {k: round(v, 4) for k, v in times.items()},
                            "note": f"fastest of {reps} interleaved rounds, one batch of {BATCH} 'unseen' prompts, "
                                    f"{threads} thread(s), nothing else running; trained rows: training seed 0",
                            "commit": commit})
    for name, t in times.items():
        print(f"{name:45s} {t:.4f} s / image  {t / times['base']:.2f}x base")
    print(f"wrote {path}")


def main(argv=None) -> None:
    ap = config.Parser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="toy-sd", choices=("toy-sd", "toy-flux"))
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/table", help="the protocol's run folders")
    ap.add_argument("--results", default="docs/results", help="the rows' JSON; timing.json is written there")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    code = config.cli(lambda: write(args.model, protocol.Protocol(out=args.out, results=args.results), args.reps,
                                    args.threads))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
