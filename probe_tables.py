"""The tables of docs/results.md §7 (can the hypernetwork write a LoRA that depends on its input?), from the JSON of
tests/test_hyperalign.py's capability fit, benchmarks/probe_adaptive.py (the probe and --gradients) and
benchmarks/diagnose_decoder.py. results.py puts them in the documents with the others."""
from __future__ import annotations

from scoring import interval_cell as cell


def capability_table(c: dict) -> str:
    """capability.json: can the hypernetwork learn two opposite LoRAs for two prompts, per head scale and lr?"""
    cells = {(r["head_gain"], r["lr"]): f"{r['loss']:.3f} / {r['adaptivity']:.3f}" for r in c["runs"]}
    lrs = sorted({r["lr"] for r in c["runs"]})
    lines = ["| head | " + " | ".join(f"lr {lr:g}: loss / adaptivity" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for gain in sorted({r["head_gain"] for r in c["runs"]}):
        name = f"`HEAD_GAIN` = {gain:g}" + (" (`nn.Linear`'s default scale)" if gain == 1 else "")
        lines.append(f"| {name} | " + " | ".join(cells.get((gain, lr), "—") for lr in lrs) + " |")
    return "\n".join(lines)


def probe_table(p: dict) -> str:
    """probe-adaptive.json (benchmarks/probe_adaptive.py): the colour gain per relation, 'same' and 'opposite' task, on
    the val prompts and (runs with --in-sample) on training prompts."""
    def label(r: dict) -> str:
        extra = ([f"rank {r['rank']}"] if "rank" in r else []) + \
            ([f"batch {r['batch_size']}"] if "batch_size" in r else []) + \
            ([f"head gain {r['head_gain']:g}"] if "head_gain" in r else []) + ([r["fix"]] if "fix" in r else [])
        return ", ".join([r["method"], *extra])
    lines = ["| task | method | steps | seeds | gain on 'left of' prompts | gain on 'right of' prompts | "
             "in-sample: 'left of' | in-sample: 'right of' |", "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["task"], label(r), r["steps"]) for r in p["rows"]))
    for task, method, steps in keys:
        runs = [r for r in p["rows"] if (r["task"], label(r), r["steps"]) == (task, method, steps)]
        def gain(rel: str, key: str) -> str:                  # in-sample: only runs made with --in-sample
            have = [r[key][rel] for r in runs if key in r]
            some = f" ({len(have)} seed{'s' * (len(have) > 1)})"
            return cell(have, 3) + (some if have and len(have) < len(runs) else "")
        lines.append(f"| {task} | {method} | {steps} | {len(runs)} | {gain('left of', 'gain')} | "
                     f"{gain('right of', 'gain')} | {gain('left of', 'gain_in_sample')} | "
                     f"{gain('right of', 'gain_in_sample')} |")
    return "\n".join(lines)


def probe_share_table(p: dict) -> str:
    """probe-adaptive.json: each HyperAlign variant's (and the static LoRA's, for reference) share of the oracle's
    headroom in "opposite", per rank: per training seed, its mean gain over the two relations over the oracle's (same
    seed, same rank), then the t-interval over seeds. Only 150-step runs with no fix, and seeds the oracle has."""
    def mean_gain(r):
        return (r["gain"]["left of"] + r["gain"]["right of"]) / 2
    plain = [r for r in p["rows"] if r["task"] == "opposite" and r["steps"] == 150 and "@" not in r["method"] and
             not {"batch_size", "head_gain", "fix"} & set(r)]
    oracle = {(r.get("rank", 4), r["seed"]): mean_gain(r) for r in plain if r["method"].startswith("oracle")}
    lines = ["| rank R | method | seeds | oracle's mean gain | method's mean gain | share of the oracle's gain |",
             "|---|---|---|---|---|---|"]
    for rank in sorted({k[0] for k in oracle}):
        for method in dict.fromkeys(r["method"] for r in plain if not r["method"].startswith("oracle")):
            runs = [r for r in plain if r["method"] == method and r.get("rank", 4) == rank and
                    (rank, r["seed"]) in oracle]
            if not runs:
                continue
            o, m = [oracle[(rank, r["seed"])] for r in runs], [mean_gain(r) for r in runs]
            lines.append(f"| {rank} | {method} | {len(runs)} | {cell(o, 3)} | {cell(m, 3)} | "
                         f"{cell([a / b for a, b in zip(m, o)], 2)} |")
    return "\n".join(lines)


def gradients_table(g: dict) -> str:
    """probe-gradients.json (probe_adaptive.py --gradients): the reward's gradient with respect to M at initialisation."""
    lines = ["| task | seed | cos(left mean, right mean) | ‖part that differs‖ | ‖part shared‖ | one sample's spread | "
             "differs / noise of a 4-sample mean |", "|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        lines.append(f"| {r['task']} | {r['seed']} | {r['cos']:.2f} | {r['differ']:.3f} | {r['share']:.3f} | "
                     f"{r['sample_spread']:.3f} | {r['differ_over_batch4_noise']:.2f} |")
    return "\n".join(lines)


def decoder_table(d: dict) -> str:
    """decoder-diagnosis.json (benchmarks/diagnose_decoder.py): attention entropy and how far a relation flip moves
    the decoder's output, trained against initialisation."""
    lines = ["| run | attention entropy (1 = uniform) | text tokens' attention share (uniform) | ‖M‖ init → trained | "
             "flip moves M (init → trained) | prompts spread M (init → trained) | flip moves h (trained) | head moved | "
             "other weights moved |", "|---|---|---|---|---|---|---|---|---|"]
    for run, r in d["runs"].items():
        t, i, a = r["trained"], r["init"], r["trained"]["attention"][0]
        lines.append(f"| `{run}` | {a['entropy']:.3f} | {a['mass']['text']:.3f} ({a['uniform']['text']:.3f}) | "
                     f"{i['M']['norm']:.2f} → {t['M']['norm']:.2f} | {i['M']['edit']:.2f} → {t['M']['edit']:.2f} | "
                     f"{i['M']['prompts']:.2f} → {t['M']['prompts']:.2f} | {t['h']['edit']:.2f} | "
                     f"{r['moved']['head']:.2f}× | {r['moved']['other_median']:.3f} |")
    return "\n".join(lines)
