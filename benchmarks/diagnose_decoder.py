"""Where does HyperAlign's decoder look, and does a prompt edit move the LoRA it makes? Trained runs against their
own initialisation (diagnostics.decoder_report), on the unseen "left of" prompts and the same prompts with "right of".

    python benchmarks/diagnose_decoder.py RUN [RUN ...] [--json docs/results/decoder-diagnosis.json] [--n 32]

Every RUN is a HyperAlign run folder (train.py, the protocol's runs/table/..., or probe_adaptive.py --keep).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import diagnostics  # noqa: E402
import files  # noqa: E402
import rundir  # noqa: E402
import runs  # noqa: E402
from toy import world  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="HyperAlign run folders")
    p.add_argument("--json", default="docs/results/decoder-diagnosis.json")
    p.add_argument("--n", type=int, default=32, help="prompt pairs")
    a = p.parse_args(argv)
    left = [q for q in world.prompts("unseen") if " left of " in q][:a.n]
    flipped = [q.replace(" left of ", " right of ") for q in left]
    pipe, out = None, {"what": __doc__.split("\n")[0], "pairs": len(left), "runs": {}}
    for run in a.runs:
        try:
            saved = rundir.read_config(run)
        except ValueError as e:                                  # a missing, unreadable or edited config.json
            p.error(str(e))
        if saved.get("method") != "hyperalign":
            p.error(f"{run}: not a HyperAlign run")
        if pipe is None:
            pipe = config.load_pipeline(config.RunConfig(**{**saved["run"], "out": "unused"}))
        method, _ = runs.load_trained(run, pipe.backbone)
        report = diagnostics.decoder_report(method, pipe, left, flipped)
        out["runs"][run] = {"steps": saved["run"]["steps"], "lr": saved["run"]["lr"],
                            "batch_size": saved["run"]["batch_size"], **report}
        t, i = report["trained"], report["init"]
        print(f"{run}: entropy {t['attention'][0]['entropy']:.3f}; M edit/prompts {t['M']['edit']:.3f}/"
              f"{t['M']['prompts']:.3f} (init {i['M']['edit']:.3f}/{i['M']['prompts']:.3f}); head moved "
              f"{report['moved']['head']:.2f}x, other weights {report['moved']['other_median']:.3f}", flush=True)
    files.write_json(a.json, out)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
