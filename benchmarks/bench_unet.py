"""Benchmark: our SD1.5 U-Net against diffusers' UNet2DConditionModel, same random weights, one process.

    python benchmarks/bench_unet.py                       # CPU fp32, batch 1, 64x64 latents (512x512 images)
    python benchmarks/bench_unet.py --device cuda         # CUDA bf16 (the default dtype there)

Both models share one set of weight tensors (built on `meta`, then assigned), runs alternate ours/diffusers so load
on the machine hits both alike, and the median of --runs timed forwards (after --warmup) is reported with the ratio
ours/diffusers and the peak memory of one forward (CUDA: max_memory_allocated; CPU: peak RSS growth, sampled).
diffusers is a benchmark-only dependency here, as in the tests.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import unet as unet_mod  # noqa: E402

SD15 = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
            cross_attention_dim=768, sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident-set growth over a block, sampled every millisecond by a thread (Linux)."""

    def __enter__(self):
        self.base = self.peak = rss()
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss())
        self.growth = self.peak - self.base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--latent", type=int, default=64, help="latent height = width (64 -> 512x512 images)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers import UNet2DConditionModel

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**SD15)
        ours = unet_mod.make_unet("sd15")
    g = torch.Generator(device).manual_seed(0)
    sd = {k: torch.empty(v.shape, device=device, dtype=dtype).normal_(0, 1.0 if v.ndim == 1 else v[0].numel() ** -0.5,
                                                                      generator=g)
          for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd, assign=True)
    ours.load_state_dict(sd, assign=True)
    ref.eval(), ours.eval()
    x = torch.randn(args.batch, 4, args.latent, args.latent, device=device, dtype=dtype)
    context = torch.randn(args.batch, 77, 768, device=device, dtype=dtype)
    t = torch.tensor([500] * args.batch, device=device)
    models = {"ours": lambda: ours(x, t, context), "diffusers": lambda: ref(x, t, encoder_hidden_states=context).sample}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {name: [] for name in models}
    peak = {}
    with torch.inference_mode():
        out = {name: fn().float() for name, fn in models.items()}
        err = ((out["ours"] - out["diffusers"]).norm() / out["diffusers"].norm()).item()
        del out
        for i in range(args.warmup + args.runs):
            for name, fn in (models.items() if i % 2 == 0 else reversed(models.items())):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                sync()
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    dt = time.perf_counter() - t0
                if i >= args.warmup:
                    times[name].append(dt)
                    peak[name] = max(peak.get(name, 0), torch.cuda.max_memory_allocated() - base
                                     if device.type == "cuda" else mem.growth)
    what = "peak CUDA memory above weights" if device.type == "cuda" else "peak RSS growth"
    print(f"SD1.5 U-Net, random weights, {device.type} {str(dtype).replace('torch.', '')}, batch {args.batch}, "
          f"{args.latent}x{args.latent} latents, threads {torch.get_num_threads()}, median of {args.runs}")
    print(f"relative error ours vs diffusers: {err:.2e}")
    for name in models:
        print(f"{name:>9}: {statistics.median(times[name]) * 1000:8.1f} ms   {what} {peak[name] / 2**20:8.1f} MiB   "
              f"runs {' '.join(f'{s * 1000:.0f}' for s in times[name])}")
    print(f"ratio ours/diffusers: {statistics.median(times['ours']) / statistics.median(times['diffusers']):.3f}")


if __name__ == "__main__":
    main()
