"""Time our FLUX transformer against diffusers' FluxTransformer2DModel, same weights, same inputs, one run.

A shallow full-width FLUX (width 3072, 24 heads, by default 1 double + 2 single blocks): per-block cost is what
matters, and both models are the same stack of blocks. CPU fp32 always; CUDA bf16 too when a GPU is present.
diffusers is a benchmark-only dependency here (never imported by the package).

    python benchmarks/bench_flux.py                      # CPU: 256 image tokens (a 256x256 image) + 64 text tokens
    python benchmarks/bench_flux.py --img-tokens 4096 --txt-tokens 512 --double 2 --single 4   # 1024px on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import weights_flux  # noqa: E402
from flux import Flux  # noqa: E402
from sampler import image_ids  # noqa: E402


def fix_malloc_threshold(nbytes: int = 1 << 16) -> None:
    """glibc: serve every allocation above `nbytes` by mmap and hand it back on free. Otherwise glibc raises this
    threshold as blocks are freed and keeps later tensors in its heap, so the peak RSS of whichever model runs second
    would be understated."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def cpu_peak_reset() -> int:
    """Reset Linux's peak-RSS counter (VmHWM) and return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def timed(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def peak_memory(fn, device: str) -> int:
    """Peak extra memory (bytes) of one call: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base
    base = cpu_peak_reset()
    fn()
    return _status("VmHWM") - base


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--double", type=int, default=1)
    p.add_argument("--single", type=int, default=2)
    p.add_argument("--img-tokens", type=int, default=256, help="a square number: (H/16)^2 for an H x H image")
    p.add_argument("--txt-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = p.parse_args()
    fix_malloc_threshold()
    from diffusers import FluxTransformer2DModel  # benchmark-only oracle
    if args.threads:
        torch.set_num_threads(args.threads)
    side = int(args.img_tokens ** 0.5)
    if side * side != args.img_tokens:
        raise SystemExit("error: --img-tokens must be a square number")

    # ---- one set of weights, both layouts
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, guidance_embeds=True)
    ref = ref.to_empty(device="cpu").eval().requires_grad_(False)
    with torch.no_grad():
        for t in ref.parameters():
            t.normal_(0, 0.02)
    config = weights_flux.flux_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = Flux(config)
    ours.load_state_dict(weights_flux.flux_diffusers_to_bfl(ref.state_dict()), strict=True, assign=True)
    ours.eval().requires_grad_(False)
    n = sum(t.numel() for t in ours.parameters())
    print(f"FLUX width {config.hidden_size}, {config.num_heads} heads, {args.double} double + {args.single} single "
          f"blocks ({n / 1e6:.0f} M parameters); batch {args.batch}, {args.img_tokens} image + {args.txt_tokens} text "
          f"tokens; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    settings = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if torch.cuda.is_available() else [])
    for device, dtype in settings:
        if (device, dtype) != ("cpu", torch.float32):
            ref.to(device, dtype)
            ours.to(device, dtype)
        B, c = args.batch, ref.config
        g = torch.Generator(device="cpu").manual_seed(0)
        img = torch.randn(B, args.img_tokens, c.in_channels, generator=g).to(device, dtype)
        txt = torch.randn(B, args.txt_tokens, c.joint_attention_dim, generator=g).to(device, dtype)
        y = torch.randn(B, c.pooled_projection_dim, generator=g).to(device, dtype)
        img_ids, txt_ids = image_ids(B, 2 * side, 2 * side, device), torch.zeros(B, args.txt_tokens, 3, device=device)
        t = torch.full((B,), 0.5, device=device, dtype=dtype)
        guidance = torch.full((B,), 3.5, device=device, dtype=dtype)

        def run_ours():
            with torch.no_grad():
                return ours(img, img_ids, txt, txt_ids, t, y, guidance)

        def run_ref():
            with torch.no_grad():
                return ref(img, txt, y, t, img_ids[0], txt_ids[0], guidance=guidance).sample

        v_ours, v_ref = run_ours().float(), run_ref().float()  # also the warm-up
        err = ((v_ours - v_ref).norm() / v_ref.norm()).item()
        # interleaved runs, so that load from other processes hits both alike
        times_ours, times_ref = [], []
        for _ in range(args.runs):
            times_ours.append(timed(run_ours, device))
            times_ref.append(timed(run_ref, device))
        t_ours, t_ref = statistics.median(times_ours), statistics.median(times_ref)
        m_ours, m_ref = peak_memory(run_ours, device), peak_memory(run_ref, device)
        name = f"{device} {str(dtype).removeprefix('torch.')}"
        print(f"{name}: ours {t_ours * 1e3:.1f} ms, diffusers {t_ref * 1e3:.1f} ms "
              f"(median of {args.runs}), ratio ours/diffusers {t_ours / t_ref:.3f}; peak extra memory per forward: "
              f"ours {m_ours / 2**20:.0f} MiB, diffusers {m_ref / 2**20:.0f} MiB; rel err {err:.1e}")


if __name__ == "__main__":
    main()
