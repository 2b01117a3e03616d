"""One HyperAlign training step at real model width: time and peak memory (CPU; CUDA when present).

Random weights (std 0.02), one sample, the reward branch of train.py's step (paper sec. 3.3, L_R):
  factors Δθ from the frozen perception encoder + the hypernetwork (with gradient), one modulated model step at x_t
  (SD: under classifier-free guidance, 2 rows), x0_hat, VAE decode, a stand-in reward (mean brightness: the real
  reward's own cost is listed separately), backward into the hypernetwork, gradient clipping, one AdamW step.
The sampling rollout before it (no gradient) costs `sampling steps` x the timed no-grad model call.

  sd15   the SD1.5-size U-Net (860 M) + the SD VAE decoder, sd15 hypernetwork preset
  flux   a FLUX-dev-width slice: --double double blocks + --single single blocks (width 3072, 24 heads), the
         FLUX VAE decoder, flux-dev hypernetwork preset (LoRA on the double blocks' attention); the full model has
         19 + 38 blocks, so its weights are listed from the parameter count (no memory needed to count them).

    python benchmarks/bench_train.py                        # CPU fp32, 256 px (SD latent 32, FLUX 256 tokens)
    python benchmarks/bench_train.py --device cuda --dtype bfloat16 --size 512 --grad-ckpt   # a real GPU
    python benchmarks/bench_train.py --device cuda --dtype bfloat16 --size 1024 --only flux --grad-ckpt
    python benchmarks/bench_train.py --tiny                  # toy sizes on the CPU: a smoke test, not a measurement
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hyperalign as H  # noqa: E402
from backbone import VP, Flow  # noqa: E402
import sampler  # noqa: E402
from flux import Flux, FluxConfig  # noqa: E402
from unet import make_unet  # noqa: E402
from vae import make_vae  # noqa: E402

GiB = 2 ** 30


# ------------------------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _status("VmRSS")


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:      # Linux: reset the peak-RSS counter (VmHWM)
            f.write("5")


def peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _status("VmHWM")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith(field + ":"))


def fix_malloc_threshold(nbytes: int = 1 << 16) -> None:
    """glibc: large blocks by mmap, handed back on free, so the second model's peak RSS is not understated."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def randomise(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """Meta-built model -> random weights on `device` in `dtype`, frozen (no grad, eval)."""
    model = model.to(dtype).to_empty(device=device)    # cast on meta first: no fp32 copy of a 12B model
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model.eval().requires_grad_(False)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------- setup

def build_sd(size: int, device, dtype, tiny: bool = False):
    with torch.device("meta"):
        unet, vae = (make_unet("toy-sd"), make_vae("toy-sd")) if tiny else (make_unet("sd15"), make_vae("sd"))
    unet, vae = randomise(unet, device, dtype), randomise(vae, device, dtype)
    backbone = VP(unet, sampler.VPSchedule.from_config(None))
    lat = size // 2 ** (len(vae.config.block_out_channels) - 1)
    x_t = torch.randn(1, unet.config.in_channels, lat, lat).to(device)              # (B, C, h, w)
    E = unet.config.cross_attention_dim
    cond = torch.randn(1, 77, E).to(device)                                         # CLIP-L hidden states
    uncond = torch.randn(1, 77, E).to(device)
    t = torch.tensor([500], device=device)

    def model_step(ha, weights):                                        # under CFG; weights: lora.Weights
        return sampler.guided(lambda *a: ha.backbone.forward(weights, *a), x_t, t, cond, uncond, 7.5)

    return dict(backbone=backbone, vae=vae, preset="toy-sd" if tiny else "sd15", x_t=x_t, t=t, cond=cond,
                model_step=model_step, decode=lambda x0: vae.decode(x0.to(dtype)),
                extra={"latent": lat, "model_rows": 2})


def build_flux(size: int, double: int, single: int, txt_tokens: int, device, dtype, tiny: bool = False):
    cfg = (replace(FluxConfig.preset("flux-tiny"), in_channels=64, out_channels=64) if tiny else
           FluxConfig(depth=double, depth_single_blocks=single))                    # flux-dev width
    with torch.device("meta"):
        model, vae = Flux(cfg), make_vae("toy-flux" if tiny else "flux")
    model, vae = randomise(model, device, dtype), randomise(vae, device, dtype)
    backbone = Flow(model)
    h = w = size // 2 ** (len(vae.config.block_out_channels) - 1)                  # latent (16, h, w)
    x_t = sampler.pack(torch.randn(1, 16, h, w)).to(device)                         # (B, h w / 4, 64)
    cond = sampler.flux_cond(torch.randn(1, txt_tokens, cfg.context_in_dim).to(device),
                             torch.randn(1, cfg.vec_in_dim).to(device), sampler.image_ids(1, h, w, device), 3.5)
    t = torch.tensor([0.5], device=device)
    with torch.device("meta"):
        full = n_params(Flux(FluxConfig()))

    return dict(backbone=backbone, vae=vae, preset="toy-flux" if tiny else "flux-dev", x_t=x_t, t=t, cond=cond,
                model_step=lambda ha, weights: ha.backbone.forward(weights, x_t, t, cond),
                decode=lambda x0: vae.decode(sampler.unpack(x0, h, w).to(dtype)),
                extra={"blocks": "flux-tiny" if tiny else f"{double} double + {single} single of 19 + 38",
                       "img_tokens": x_t.shape[1], "txt_tokens": txt_tokens, "model_rows": 1,
                       "full_model_params_M": round(full / 1e6),
                       "full_model_weights_bf16_gib": round(2 * full / GiB, 2)})


# ------------------------------------------------------------------------------------------------------------ step

def bench(case: dict, device, grad_ckpt: bool, rank: int | None) -> dict:
    bb, vae = case["backbone"], case["vae"]
    bb.model.gradient_checkpointing = grad_ckpt
    bb.model.train(grad_ckpt)                       # the U-Net checkpoints only in training mode (train.py does so)
    cfg = H.HyperConfig.preset(case["preset"], **({"rank": rank, "alpha": float(rank)} if rank else {}))
    torch.manual_seed(0)
    ha = H.HyperAlign(cfg, bb).to(device)
    with torch.no_grad():                           # a non-zero LoRA, as after some training
        for p in ha.hypernet.decoder.head.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    opt = torch.optim.AdamW(ha.hypernet.parameters(), lr=1e-4)
    x_t, t, cond = case["x_t"], case["t"], case["cond"]
    frozen = n_params(bb.model) + n_params(vae)
    res = {**case["extra"], "frozen_params_M": round(frozen / 1e6),
           "hypernet_params_M": round(n_params(ha.hypernet) / 1e6, 2)}

    with torch.no_grad():
        kept = ha.prepared(ha.factors(x_t, t, cond))                    # a LoRA kept for its segment (I, P)

    def model_call():                               # one sampling-step model call (the rollout is N of these)
        with torch.no_grad():
            case["model_step"](ha, kept)

    def train_step():
        factors = ha.factors(x_t, t, cond)                              # Δθ = H(E(x_t, t, c)), with gradient
        with ha.applied(factors):                                       # forward and backward with θ + Δθ
            pred = case["model_step"](ha, None)
            images = case["decode"](bb.x0_hat(x_t, t, pred)).float()    # (1, 3, H, W)
            loss = -(images / 2 + 0.5).clamp(0, 1).mean()               # stand-in for -r(D(x0_hat))
            loss.backward()
        torch.nn.utils.clip_grad_norm_(ha.hypernet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":                       # NOTE: CUDA's first calls pay for kernel selection and
        model_call()                                # allocator growth (SD1.5: 5 s instead of 25 ms): warm up once;
        train_step()                                # the Adam state then counts in start_gib
    sync(device)
    t0 = time.perf_counter()
    model_call()
    sync(device)
    res["nograd_model_call_s"] = round(time.perf_counter() - t0, 3)

    before = mem_now(device)                        # weights (+ the process itself on CPU)
    res["start_gib"] = round(before / GiB, 2)
    peak_reset(device)
    sync(device)
    t0 = time.perf_counter()
    train_step()
    sync(device)
    res["train_step_s"] = round(time.perf_counter() - t0, 3)
    res["peak_gib"] = round(peak(device) / GiB, 2)                      # process RSS (CPU) / allocator (CUDA)
    res["peak_over_start_gib"] = round((peak(device) - before) / GiB, 2)   # activations, merged weights, Adam
    assert all(p.grad is None for p in bb.model.parameters()) and all(p.grad is None for p in vae.parameters())
    assert all(torch.isfinite(p).all() for p in ha.hypernet.parameters())
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="frozen models' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: CUDA 512, CPU 256)")
    p.add_argument("--only", choices=("sd15", "flux"), default=None)
    p.add_argument("--double", type=int, default=2, help="FLUX slice: double blocks (>= the encoder depth 2)")
    p.add_argument("--single", type=int, default=2, help="FLUX slice: single blocks")
    p.add_argument("--txt-tokens", type=int, default=None, help="FLUX T5 tokens (default: CUDA 512, CPU 64)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the preset's)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the frozen model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: a smoke test of this script")
    a = p.parse_args()
    device = torch.device("cpu" if a.tiny else a.device)
    cuda = device.type == "cuda"
    if a.threads:
        torch.set_num_threads(a.threads)
    fix_malloc_threshold()
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    size = a.size or (16 if a.tiny else 512 if cuda else 256)
    head = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
            "dtype": str(dtype).removeprefix("torch."), "size_px": size, "grad_ckpt": a.grad_ckpt}
    print(json.dumps(head), flush=True)
    for name in ("sd15", "flux"):
        if a.only not in (None, name):
            continue
        torch.manual_seed(0)
        case = (build_sd(size, device, dtype, a.tiny) if name == "sd15" else
                build_flux(size, a.double, a.single, a.txt_tokens or (512 if cuda else 64), device, dtype, a.tiny))
        res = bench(case, device, a.grad_ckpt, a.rank)
        print(json.dumps({"model": name, **res}), flush=True)
        del case
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
