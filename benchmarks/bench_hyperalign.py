"""HyperAlign's cost: sampling wall time of variants I, P, S relative to the base model, and one training step.

Random weights, same seeds, one prompt with classifier-free guidance (the paper's setting; targets I <= 1.05x,
S <= 1.5x; the paper reports I ~1.0x, S ~1.3-1.7x), measured end to end and, more robustly on a busy machine, as
per-call costs (base step, modulated step, hypernetwork call, weight merge) combined into the ratio for 50 steps:
  toy     the toy-sd U-Net (16x16 latents)
  sd15    the SD1.5-size U-Net (860M) at --latent (64 = 512 px; CPU default 32 = 256 px to keep it minutes)
and one hypernetwork training step on the SD1.5-size U-Net (factors with gradient, one modulated U-Net step under
CFG, backward into the hypernetwork; a squared-x0_hat stand-in replaces VAE + reward): time and peak memory.

    python benchmarks/bench_hyperalign.py                              # CPU fp32
    python benchmarks/bench_hyperalign.py --device cuda --dtype bfloat16 --latent 64 --steps 50
    python benchmarks/bench_hyperalign.py --batches 1,4,16 --json benchmarks/results/sampling-batch.json
                                            # the shipped toy SD / FLUX, batch 1 / 4 / 16, I / P / S vs base
    python benchmarks/bench_hyperalign.py --batches 1,4,16 --steady-malloc \
        --json benchmarks/results/sampling-batch-steady.json      # the same, freed memory kept (no page faults)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hyperalign as H  # noqa: E402
from backbone import VP  # noqa: E402
import sampler  # noqa: E402
from unet import make_unet  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:   # Linux: reset the peak-RSS counter (VmHWM)
            f.write("5")


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmHWM:"))


def build(preset: str, device: str, dtype: torch.dtype, rank: int | None) -> H.HyperAlign:
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = make_unet(preset)
    unet = unet.to_empty(device=device)
    for p in unet.parameters():                             # random weights, small enough to keep activations sane
        torch.nn.init.normal_(p, std=0.02)
    unet = unet.to(dtype).eval().requires_grad_(False)
    cfg = H.HyperConfig.preset("toy-sd" if preset == "toy-sd" else "sd15", **({"rank": rank} if rank else {}))
    ha = H.HyperAlign(cfg, VP(unet, sampler.VPSchedule.from_config(None))).to(device)
    with torch.no_grad():                                   # a non-zero LoRA, as after training
        for p in ha.hypernet.decoder.head.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return ha


def bench_sampling(ha: H.HyperAlign, latent: int, steps: int, runs: int, device: str, dtype, n: int = 1) -> dict:
    unet, sched = ha.backbone.model, ha.backbone.schedule
    C, E = unet.config.in_channels, unet.config.cross_attention_dim
    cond, uncond = torch.randn(n, 77, E, device=device, dtype=dtype), torch.zeros(n, 77, E, device=device, dtype=dtype)
    x_T = torch.randn(n, C, latent, latent, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ha.cfg.key_steps, ha.cfg.key_of = tuple(H.key_steps(torch.randn(steps, 1, 8).cumsum(0), 3)), steps
    models = {"base": lambda: (lambda x, t, c: unet(x, t, c)), **{v: (lambda v=v: ha.sampler_model(cond, steps, v))
                                                                   for v in ("I", "P", "S")}}
    times = {k: [] for k in models}
    with torch.no_grad():
        for r in range(runs + 1):                           # run 0 warms up
            for name, make in models.items():
                sync(device)
                t0 = time.perf_counter()
                sampler.ddim_sample(make(), x_T, cond, sched, steps, uncond=uncond, guidance=7.5)
                sync(device)
                if r:
                    times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["base"])
    out = {"base_s": round(base, 3)}
    out.update({f"{k}_x": round(statistics.median(v) / base, 3) for k, v in times.items() if k != "base"})
    return out


def bench_batches(model: str, batches: list[int], steps: int, runs: int) -> dict:
    """The shipped toy model (toy SD: DDIM with CFG 5; toy FLUX: Euler), base vs HyperAlign-I / P / S sampling wall
    time at each batch size (every sample its own LoRA: lora.py's unmerged path above one), median of `runs` timed
    runs after a warm-up, all four interleaved so that load on the machine falls on each alike."""
    import pipeline
    from toy import world
    pipe = pipeline.load(world.SD_DIR if model == "toy-sd" else world.FLUX_DIR, steps=steps)
    torch.manual_seed(0)
    ha = H.HyperAlign(H.HyperConfig.preset(model), pipe.backbone)
    with torch.no_grad():                                   # a non-zero LoRA, as after training
        for p in ha.hypernet.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ha.cfg.key_steps, ha.cfg.key_of = (0, 5, 10, 15), steps
    prompts = world.eval_prompts("unseen", max(batches))
    out = {}
    for n in batches:
        cond, uncond = pipe.conds(prompts[:n])
        x_T = pipe.noise(n, torch.Generator().manual_seed(0))
        models = {"base": lambda: pipe.backbone, **{v: (lambda v=v: ha.sampler_model(cond, steps, v)) for v in "IPS"}}
        times = {k: [] for k in models}
        with torch.no_grad():
            for r in range(runs + 1):                       # run 0 warms up
                for name, make in models.items():
                    t0 = time.perf_counter()
                    pipe.rollout(make(), x_T, cond, uncond, trajectory=False)
                    if r:
                        times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["base"])
        out[str(n)] = {"base_s": round(base, 4), **{f"{k}_x": round(statistics.median(v) / base, 3)
                                                     for k, v in times.items() if k != "base"}}
        print(model, n, out[str(n)], flush=True)
    return out


def steady_malloc() -> None:
    """glibc's malloc told to keep what is freed: no heap trimming and no mmap for blocks under 32 MiB.
    NOTE: at batch 16 on toy SD a 20-step rollout made 36-68 k minor page faults (the U-Net's activations are
    megabytes: glibc returns them to the system and faults them back in), and how many depended on what ran before in
    the process, so ratios to the base model moved by up to ~0.15 between runs (HyperAlign-I at batch 16: 1.16 and
    1.26 in two runs; 1.11 with this). With this, what is timed is the computation."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    for param, value in ((M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 2**30), (M_TOP_PAD, 256 * 2**20)):
        if libc.mallopt(param, value) != 1:
            raise SystemExit(f"error: --steady-malloc: mallopt({param}, {value}) failed (not glibc?)")


def bench_components(ha: H.HyperAlign, latent: int, reps: int, device: str, dtype, steps: int = 50, k: int = 3,
                     n: int = 1) -> dict:
    """Per-call costs, interleaved and repeated (robust on a busy machine), and the sampling-time ratios they imply
    for `steps` DDIM steps with CFG: u base step, u_mod modulated step (kept merged weights), h hypernetwork call
    (perception encoder + decoder), m merging W + s B A.  I = (N u_mod + h + m) / (N u), S = (u_mod + h + m) / u,
    P = (N u_mod + (K + 1)(h + m)) / (N u)."""
    unet = ha.backbone.model
    C, E = unet.config.in_channels, unet.config.cross_attention_dim
    x = torch.randn(n, C, latent, latent, device=device, dtype=dtype)
    cond, uncond = torch.randn(n, 77, E, device=device, dtype=dtype), torch.zeros(n, 77, E, device=device, dtype=dtype)
    t = torch.tensor([500] * n, device=device)
    x2, t2, c2 = sampler.guidance_rows(x, t, cond, uncond)
    with torch.no_grad():
        params = ha.prepared(ha.factors(x, t, cond))
        calls = {"u": lambda: unet(x2, t2, c2), "u_mod": lambda: ha.backbone.forward(params, x2, t2, c2),
                 "h": lambda: ha.factors(x, t, cond), "m": lambda: ha.prepared(ha.factors(x, t, cond)) and None}
        times = {k_: [] for k_ in calls}
        for r in range(reps + 1):
            for name, fn in calls.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if r:
                    times[name].append(time.perf_counter() - t0)
    c = {k_: statistics.median(v) for k_, v in times.items()}
    c["m"] = max(c["m"] - c["h"], 0.0)                      # m was timed together with a hypernetwork call
    N, u, um, hm = steps, c["u"], c["u_mod"], c["h"] + c["m"]
    return {**{f"{k_}_s": round(v, 4) for k_, v in c.items()}, "steps": N,
            "I_x": round((N * um + hm) / (N * u), 3), "P_x": round((N * um + (k + 1) * hm) / (N * u), 3),
            "S_x": round((um + hm) / u, 3)}


def bench_train_step(ha: H.HyperAlign, latent: int, device: str, dtype, grad_ckpt: bool) -> dict:
    unet = ha.backbone.model
    unet.gradient_checkpointing = grad_ckpt
    unet.train(grad_ckpt)
    C, E = unet.config.in_channels, unet.config.cross_attention_dim
    x = torch.randn(1, C, latent, latent, device=device, dtype=dtype)
    cond, uncond = torch.randn(1, 77, E, device=device, dtype=dtype), torch.zeros(1, 77, E, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    opt = torch.optim.AdamW(ha.hypernet.parameters(), lr=1e-4)
    res = {}
    for i in range(2):                                       # step 0 warms up (and allocates the Adam state)
        peak_reset(device)
        sync(device)
        t0 = time.perf_counter()
        factors = ha.factors(x, t, cond)
        with ha.applied(factors):
            x0_hat = ha.backbone.x0_hat(x, t, sampler.guided(unet, x, t, cond, uncond, 7.5))
            x0_hat.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        res = {"train_step_s": round(time.perf_counter() - t0, 3), "peak_mem_gib": round(peak_bytes(device) / 2**30, 2)}
    assert all(p.grad is None for p in unet.parameters())
    unet.train(False)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (CPU 10, CUDA 50)")
    p.add_argument("--latent", type=int, default=None, help="SD1.5 latent size (CPU 32, CUDA 64)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="SD1.5: samples per sampling call (each its own LoRA)")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--skip-sd15", action="store_true")
    p.add_argument("--components-only", action="store_true",
                   help="SD1.5: per-call costs and the ratios they imply, no end-to-end sampling (CPU: minutes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default torch's; 1 on a busy machine)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the training step")
    p.add_argument("--batches", default="", help="only the toy models' sampling cost at these batch sizes, e.g. "
                   "1,4,16 (CPU, 1 thread, --steps 20), written to --json")
    p.add_argument("--json", default=None, help="with --batches: the JSON file to write")
    p.add_argument("--steady-malloc", action="store_true", help="with --batches: glibc keeps freed memory (no page "
                   "faults from returning it and taking it back; see steady_malloc)")
    a = p.parse_args()
    if a.batches:
        torch.set_num_threads(a.threads or 1)
        if a.steady_malloc:
            steady_malloc()
        batches = [int(b) for b in a.batches.split(",")]
        res = {"device": f"cpu ({torch.get_num_threads()} thread)", "steps": a.steps or 20, "runs": a.runs,
               "malloc": "steady" if a.steady_malloc else "glibc default",
               "note": "median of --runs timed runs after a warm-up; ratios are HyperAlign's time over the base "
                       "model's at the same batch", **{m: bench_batches(m, batches, a.steps or 20, a.runs)
                                                       for m in ("toy-sd", "toy-flux")}}
        if a.json:
            with open(a.json, "w") as f:
                json.dump(res, f, indent=2)
        print(json.dumps(res, indent=2))
        return
    cuda = a.device == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    steps, latent = a.steps or (50 if cuda else 10), a.latent or (64 if cuda else 32)
    res = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
           "dtype": str(dtype), "sampling_steps": steps}
    toy = build("toy-sd", a.device, dtype, a.rank)
    res["toy"] = bench_sampling(toy, 16, steps, a.runs, a.device, dtype)
    res["toy"]["per_call"] = bench_components(toy, 16, 5 * a.runs, a.device, dtype)
    print(json.dumps(res), flush=True)
    if not a.skip_sd15:
        ha = build("sd15", a.device, dtype, a.rank)
        res["sd15"] = {"latent": latent, "batch": a.batch,
                       "hypernet_params": sum(q.numel() for q in ha.hypernet.parameters())}
        if not a.components_only:
            res["sd15"].update(bench_sampling(ha, latent, steps, a.runs, a.device, dtype, a.batch))
        res["sd15"]["per_call"] = bench_components(ha, latent, a.runs, a.device, dtype, n=a.batch)
        print(json.dumps(res), flush=True)
        res["sd15"].update(bench_train_step(ha, latent, a.device, dtype, a.grad_ckpt))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
