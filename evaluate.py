"""The miniature tables: `python evaluate.py` trains what is missing and scores every row of the toy protocol on both
toy models (protocol.py: the rows, the settings search on 'val', --budget); `python evaluate.py --model PATH ...`
scores trained runs on a real checkpoint, as the paper's Table 1 (real_model).

Every result file that exists is refused unless --overwrite. Bad input: one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch

import config
import files
import protocol
import rundir
import runs
import scoring
from config import RunConfig
from protocol import ROWS, Protocol, Rewards, best_of_n_gen, freedom_gen, guidance_gen, search_gen
from scoring import t_interval


# ---------------------------------------------------------------------------------------------------- real models

# the paper's Table 1 columns, in its order, by reward name in --score; CLIP is reported as the plain cosine
PAPER_COLUMNS = [("aesthetic", "Aesthetic", 1.0), ("pick", "PickScore", 1.0), ("imagereward", "ImageReward", 1.0),
                 ("clip", "CLIP", 0.01), ("hps", "HPS", 1.0)]


def real_model(args) -> None:
    """The paper's Table 1 on a real checkpoint: base, every --hyper run (HyperAlign or static LoRA) and the optional
    test-time rows, on --prompts x --sample-seeds at the paper's sampling settings (SD1.5: 50 DDIM steps, CFG 7.5;
    FLUX: 50 steps, guidance 3.5), scored by every reward of --score. Under torchrun each process samples its share of
    the prompts; rank 0 writes OUT/table.json and OUT/table.md (mean ± 95% t-interval over prompts)."""
    import distributed
    import pipeline
    ctx, device = distributed.init(args.device)
    pipe = pipeline.load(args.model, device, getattr(torch, args.dtype), steps=args.sample_steps or 50,
                         guidance=args.guidance, tokenizer=args.tokenizer)
    score = config.load_reward(args.score, args.reward_tokenizer, device, args.dtype, "--score")
    prompts = config.read_prompts(args.prompts)[:args.n_prompts]
    mine = prompts[ctx.rank::ctx.world]
    rows = [("base", scoring.sampler(pipe, lambda c: pipe.backbone))]
    for d in args.hyper:
        m, saved = runs.load_trained(d, pipe.backbone, device)
        name = f"HyperAlign-{m.cfg.variant}" if saved["method"] == "hyperalign" else "static LoRA"
        rows.append((f"{name} ({os.path.basename(os.path.normpath(d))})",
                     scoring.sampler(pipe, lambda c, m=m: m.sampler_model(c, pipe.steps))))
    if args.bon > 1 or args.rho or args.freedom or args.eps_greedy:
        train_reward = config.load_reward(args.reward or args.score, args.reward_tokenizer, device, args.dtype)
        if args.bon > 1:
            rows.append((f"Best-of-{args.bon}", best_of_n_gen(pipe, train_reward, args.bon)))
        if args.rho:
            rows.append((f"guidance ρ={args.rho:g}", guidance_gen(pipe, train_reward, args.rho)))
        if args.freedom:
            rows.append(("FreeDoM", freedom_gen(pipe, train_reward)))
        if args.eps_greedy:
            n, k = args.eps_greedy
            rows.append((f"ε-greedy search (N {n}, K {k})", search_gen(pipe, train_reward, {"n": n, "k": k})))
    seeds = list(range(args.sample_seeds))
    table = {}
    for name, generate in rows:
        m = scoring.measure(generate, pipe, mine, seeds, score, None, None, batch=args.batch, desc=name,
                            per_image=True)[0]
        per = {k.removeprefix("reward/"): torch.tensor(v).view(len(seeds), len(mine)).mean(0).tolist()
               for k, v in m["per_image"].items()}
        gathered = distributed.gather((per, m["sec_per_image"]), ctx)
        if ctx.main:                                   # per-prompt means of every rank, and the slowest rank's time
            per = {k: [x for g, _ in gathered for x in g[k]] for k in per}
            table[name] = {k: dict(zip(("mean", "ci95"), t_interval(v))) for k, v in per.items()}
            table[name]["sec_per_image"] = max(t for _, t in gathered)
    distributed.close()
    if not ctx.main:
        return
    os.makedirs(args.out, exist_ok=True)
    settings = {"model": args.model, "prompts": f"{args.prompts} ({len(prompts)} prompts)", "sample_seeds": args.sample_seeds,
                "steps": pipe.steps, "guidance": pipe.guidance, "size": pipe.height, "score": args.score,
                "processes": ctx.world}
    files.write_json(os.path.join(args.out, "table.json"), {"settings": settings, "rows": table})
    files.write_text(os.path.join(args.out, "table.md"), paper_table(table, settings))
    print(paper_table(table, settings))


def paper_table(table: dict, settings: dict) -> str:
    """Markdown laid out like the paper's Table 1: Aesthetic, PickScore, ImageReward, CLIP, HPS, time per image."""
    names = next(iter(table.values())).keys()
    cols = [(k, label, f) for k, label, f in PAPER_COLUMNS if k in names] + \
        [(k, k, 1.0) for k in names if k != "sec_per_image" and k not in {c[0] for c in PAPER_COLUMNS}]
    lines = [f"*{settings['model']}: {settings['prompts']} x {settings['sample_seeds']} seeds, {settings['steps']} "
             f"steps, guidance {settings['guidance']}, {settings['size']} px; mean ± 95% interval over prompts.*", "",
             "| Method | " + " | ".join(f"{label} ↑" for _, label, _ in cols) + " | Time (s) ↓ |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, r in table.items():
        cells = [f"{r[k]['mean'] * f:.4f} ± {r[k]['ci95'] * f:.4f}" for k, _, f in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['sec_per_image']:.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="toy-sd,toy-flux", help="comma-separated toy models (toy-sd, toy-flux)")
    p.add_argument("--rows", default="", help="comma-separated row names or slugs to run (default: all)")
    p.add_argument("--train-seeds", default="0,1,2", help="training seeds of every trained row")
    p.add_argument("--sample-seeds", type=int, default=4, help="samples per 'unseen' prompt")
    p.add_argument("--heldout-seeds", type=int, default=1, help="samples per 'heldout' prompt (0: skip the set)")
    p.add_argument("--n-prompts", type=int, default=None, help="prompts per set (default: all)")
    p.add_argument("--out", default="runs/table", help="run folders of the trained rows (reused when finished)")
    p.add_argument("--results", default="docs/results", help="where the JSON of every row goes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--search", action="store_true", help="choose the settings on the 'val' split (search.json; toy "
                   "FLUX: the learning rates at toy SD's other settings, search-toy-flux.json)")
    p.add_argument("--budget", default="", help="comma-separated step counts: HyperAlign-I and the static LoRA at "
                   "their chosen settings, trained that long and scored on 'val' (budget.json)")
    p.add_argument("--search-part", default="0/1", help="K/N: train and score every N-th setting from K (parallel "
                   "processes); a final --search without it reuses them and chooses")
    g = p.add_argument_group("a real checkpoint (the paper's Table 1)")
    g.add_argument("--model", default=None, help="an SD1.5 / FLUX path instead of the toy models")
    g.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder, for a single-file SD model")
    g.add_argument("--score", default=None, help="the table's rewards, e.g. aesthetic:CLIP+MLP,pick:DIR,"
                   "imagereward:PT+BERT_TOKENIZER,clip:DIR,hps:PT")
    g.add_argument("--reward", default=None, help="the reward of Best-of-N and guidance (default: --score)")
    g.add_argument("--reward-tokenizer", default=None, help="CLIP tokenizer folder for HPS")
    g.add_argument("--prompts", default=None, help="prompt file, e.g. prompts/partiprompts.txt")
    g.add_argument("--hyper", nargs="*", default=[], help="trained run folders of train.py / baselines.py (rows)")
    g.add_argument("--sample-steps", type=int, default=None, help="default 50 (the paper's)")
    g.add_argument("--guidance", type=float, default=None, help="default: SD1.5 CFG 7.5, FLUX 3.5")
    g.add_argument("--batch", type=int, default=4, help="samples per generation batch")
    g.add_argument("--bon", type=int, default=1, help="add a Best-of-N row (N > 1)")
    g.add_argument("--rho", type=float, default=0.0, help="add a gradient-guidance row with this step")
    g.add_argument("--freedom", action="store_true", help="add a FreeDoM row (testtime.freedom; VP models)")
    g.add_argument("--eps-greedy", default=None, help="add an ε-greedy search row: N,K (the authors': 4,20)")
    g.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true", help="replace result files that exist (refused otherwise)")
    g.add_argument("--dtype", default="float32", choices=config.DTYPES)
    args = p.parse_args(argv)
    try:
        args.eps_greedy = tuple(int(x) for x in args.eps_greedy.split(",")) if args.eps_greedy else None
        assert args.eps_greedy is None or (len(args.eps_greedy) == 2 and min(args.eps_greedy) >= 1)
    except (ValueError, AssertionError):
        p.error(f"--eps-greedy: N,K with N, K >= 1, got {args.eps_greedy!r}")
    try:
        args.train_seeds = [int(s) for s in args.train_seeds.split(",") if s]
    except ValueError:
        p.error(f"--train-seeds: comma-separated integers, got {args.train_seeds!r}")
    try:
        args.budget = [int(s) for s in args.budget.split(",") if s]
        assert all(s > 0 for s in args.budget)
    except (ValueError, AssertionError):
        p.error(f"--budget: comma-separated positive step counts, got {args.budget!r}")
    try:
        args.search_part = tuple(int(x) for x in args.search_part.split("/"))
        assert len(args.search_part) == 2 and 0 <= args.search_part[0] < args.search_part[1]
    except (ValueError, AssertionError):
        p.error(f"--search-part: K/N with 0 <= K < N, got {args.search_part!r}")
    for k in ("sample_seeds", "threads", "bon", "batch"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.heldout_seeds < 0 or (args.n_prompts is not None and args.n_prompts < 1):
        p.error("--heldout-seeds must be >= 0 and --n-prompts >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.model is not None and not (args.score and args.prompts):
        p.error("a real --model needs --score and --prompts")
    for k in ("guidance", "rho"):
        if getattr(args, k) is not None and not math.isfinite(getattr(args, k)):
            p.error(f"--{k} must be a finite number, got {getattr(args, k)}")
    real = [f"--{k.replace('_', '-')}" for k in REAL_ONLY if getattr(args, k) != p.get_default(k)]
    if args.model is None and real:       # never ignored: without --model they would start the hours-long toy tables
        p.error(f"{', '.join(real)} belong to the real-checkpoint table: pass --model PATH too (without it "
                "evaluate.py runs the toy protocol)")
    return args


# the flags of the real-checkpoint table: given without --model, they are refused
REAL_ONLY = ("tokenizer", "score", "reward", "reward_tokenizer", "prompts", "hyper", "sample_steps", "guidance",
             "bon", "rho", "freedom", "eps_greedy", "batch", "dtype")


def run(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = {w.strip() for w in args.rows.split(",") if w.strip()}
    unknown = wanted - {r.name for r in ROWS} - {r.slug for r in ROWS}
    if unknown:
        raise ValueError(f"--rows: unknown {sorted(unknown)}; rows: {', '.join(r.slug for r in ROWS)}")
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in ("toy-sd", "toy-flux")]
    if bad:
        raise ValueError(f"--models: {bad} are not toy models (toy-sd, toy-flux); use --model PATH")
    rows = [(m, r) for m in models for r in ROWS if m in r.models and (not wanted or r.name in wanted or
                                                                        r.slug in wanted)]
    searched = {"toy-sd": "search.json", "toy-flux": "search-toy-flux.json"}       # toy FLUX: learning rates only
    outputs = ([os.path.join(args.out, "table.json"), os.path.join(args.out, "table.md")] if args.model is not None else
               [os.path.join(args.results, searched[m]) for m in models] if args.search and args.search_part[1] == 1
               else [os.path.join(args.results, "budget.json")] if args.budget else [] if args.search else
               [os.path.join(args.results, m, f"{r.slug}.json") for m, r in rows])
    for path in outputs:                                  # every result file checked before hours of work
        rundir.check_output(path, args.overwrite, "--results" if args.model is None else "--out")
    os.makedirs(args.out, exist_ok=True)
    if args.model is not None:
        return real_model(args)
    p = Protocol(args.out, args.results, tuple(args.train_seeds), args.sample_seeds, args.heldout_seeds,
                 args.n_prompts, args.search_part, tuple(args.budget))
    if args.search:
        for model in models:
            print(model, (protocol.search(p, Rewards()) if model == "toy-sd" else
                          protocol.lr_search(p, Rewards(), model))["chosen"])
        return
    if args.budget:
        return print(protocol.budget(p, Rewards())["runs"])
    rewards = Rewards()
    for model in models:
        pipe = config.load_pipeline(RunConfig.from_preset(model))
        for m, row in rows:
            if m != model:
                continue
            t0 = time.time()
            record = protocol.run_row(row, model, pipe, p, rewards)
            record["minutes"] = round((time.time() - t0) / 60, 1)
            path = os.path.join(args.results, model, f"{row.slug}.json")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files.write_json(path, record)
            print(f"{model} / {row.name}: {record['minutes']} min -> {path}", flush=True)


def main(argv=None) -> None:
    code = config.cli(lambda: run(argv))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
