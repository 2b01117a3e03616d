"""Sampling cost on a GPU, in one run (benchmarks/gpu.sh): our pipeline against diffusers' StableDiffusionPipeline
with the same random weights, and HyperAlign-I / -P / -S against our base model, eager and through the fast path.

SD1.5-size models with random weights (std 0.02, seeded), bf16, 512 px, 50 DDIM steps, CFG 7.5, one prompt; times are
medians of --runs after a warm-up run (compilation happens in the warm-up). Writes --out (JSON) with the keys
  base_s                 our pipeline, fast path (CUDA graph), batch 1
  base_eager_s           our pipeline, eager
  diffusers_s            StableDiffusionPipeline, eager
  diffusers_compiled_s   StableDiffusionPipeline with torch.compile(unet) and channels_last
  I_x, P_x, S_x          HyperAlign over our base, both on the fast path, batch 1
  batch4                 the same at batch 4 (each sample its own LoRA: the per-sample path, eager)
  per_call               U-Net call, modulated call, hypernetwork call, merge; eager and fast
  flux_slice             a FLUX-width slice (2 double + 2 single blocks, 1024 image tokens): ours vs diffusers, I / S
`--tiny` runs the same code on toy sizes on the CPU (eager only): a smoke test, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import accel  # noqa: E402
import hyperalign as H  # noqa: E402
import pipeline  # noqa: E402
import sampler  # noqa: E402


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, runs: int, device) -> float:
    fn()                                                      # warm-up: compilation, graph capture, allocator
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_sd_folder(folder: str, tiny: bool) -> None:
    """A diffusers SD1.5-layout pipeline folder with random weights (a tiny one with --tiny)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from sd_tiny import SD15_DDIM, TEXT, UNET, VAE, write_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    tok = write_tokenizer(os.path.join(folder, "tokenizer"))
    if tiny:
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), **TEXT))
    else:                                                     # SD1.5's sizes (diffusers' defaults are SD1.5's)
        unet, vae = UNet2DConditionModel(cross_attention_dim=768, sample_size=64), AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.02)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=DDIMScheduler(**SD15_DDIM),
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)


def hyperalign_on(pipe, tiny: bool) -> H.HyperAlign:
    cfg = H.HyperConfig.preset("toy-sd" if tiny else "sd15", key_steps=(0, 2, 4, 6), key_of=20)
    ha = H.HyperAlign(cfg, pipe.backbone).to(pipe.device)
    with torch.no_grad():                                     # Δθ != 0, as after training
        for p in ha.hypernet.decoder.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    return ha


def ours(pipe, ha, variant, fast, batch: int, prompt: str = "a photo of a cat"):
    """One sample (or a batch) of our pipeline: base (variant None) or HyperAlign, fast path or eager."""
    def run():
        cond, uncond = pipe.conds([prompt] * batch)
        x_T = pipe.noise(batch, torch.Generator().manual_seed(0))
        model = (fast.base_model() if fast else pipe.backbone) if variant is None else \
            ha.sampler_model(cond, pipe.steps, variant, fast=fast)
        pipe.decode(pipe.rollout(model, x_T, cond, uncond, trajectory=False))
    return run


def per_call(pipe, ha, fast, runs: int) -> dict:
    """U-Net call u (2 CFG rows), modulated call, hypernetwork call h, merge m (eager), and the fast call."""
    cond, uncond = pipe.conds(["a photo of a cat"])
    x = pipe.noise(1, torch.Generator().manual_seed(0))
    t = pipe.t_batch(pipe.timesteps()[0], 1)
    x2, t2, c2 = sampler.guidance_rows(x, t, cond, uncond)
    with torch.no_grad():
        factors = ha.factors(x, t, cond)
        params = ha.prepared(factors)
        calls = {"u_s": lambda: pipe.backbone(x2, t2, c2), "u_mod_s": lambda: pipe.backbone.forward(params, x2, t2, c2),
                 "h_s": lambda: ha.factors(x, t, cond), "m_s": lambda: ha.prepared(factors)}
        if fast is not None:
            calls["u_fast_s"] = lambda: fast(x2, t2, c2)
        return {k: round(median_time(fn, runs, pipe.device), 5) for k, fn in calls.items()}


def flux_slice(device, dtype, runs: int, tiny: bool) -> dict:
    """A FLUX-width slice, ours vs diffusers' FluxTransformer2DModel (same weights), and HyperAlign-I / -S calls."""
    from diffusers import FluxTransformer2DModel

    import weights_flux
    from backbone import Flow
    from flux import Flux
    from sampler import flux_cond, image_ids
    kw = dict(num_layers=2, num_single_layers=2, attention_head_dim=128, num_attention_heads=24,
              joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    if tiny:
        kw.update(num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32, pooled_projection_dim=16,
                  axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    ref = FluxTransformer2DModel(**kw).to(device, dtype).eval()
    model = Flux(weights_flux.flux_config_from_diffusers(dict(ref.config))).to(device, dtype).eval()
    model.load_state_dict(weights_flux.flux_diffusers_to_bfl(ref.state_dict()))
    n_img, n_txt = (16, 8) if tiny else (1024, 512)
    x = torch.randn(1, n_img, 64, device=device)
    txt = torch.randn(1, n_txt, kw["joint_attention_dim"], device=device)
    y = torch.randn(1, kw["pooled_projection_dim"], device=device)
    side = int(n_img ** 0.5)
    cond = flux_cond(txt, y, image_ids(1, 2 * side, 2 * side, device), 3.5)
    t = torch.full((1,), 0.5, device=device)
    bb = Flow(model)
    ha = H.HyperAlign(H.HyperConfig.preset("toy-flux" if tiny else "flux-dev"), bb).to(device)
    with torch.no_grad():
        params = ha.prepared(ha.factors(x, t, cond))
        calls = {"ours_s": lambda: bb(x, t, cond),
                 "diffusers_s": lambda: ref(hidden_states=x.to(dtype), encoder_hidden_states=txt.to(dtype),
                                            pooled_projections=y.to(dtype), timestep=t.to(dtype),
                                            img_ids=cond["img_ids"][0], txt_ids=cond["txt_ids"][0],
                                            guidance=cond["guidance"].to(dtype)),
                 "modulated_s": lambda: bb.forward(params, x, t, cond), "hypernet_s": lambda: ha.factors(x, t, cond)}
        out = {k: round(median_time(fn, runs, device), 5) for k, fn in calls.items()}
    out["ours_x_diffusers"] = round(out["ours_s"] / out["diffusers_s"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: a smoke test of this script")
    p.add_argument("--skip-compile", action="store_true", help="no torch.compile rows (they take minutes to build)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", f"gpu-{time.strftime('%Y-%m-%d')}.json"))
    a = p.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke)", "torch": torch.__version__,
           "dtype": str(dtype), "steps": a.steps, "guidance": 7.5, "size_px": 32 if a.tiny else 512}
    from diffusers import StableDiffusionPipeline
    with tempfile.TemporaryDirectory() as folder:
        random_sd_folder(folder, a.tiny)
        ref = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        ref.set_progress_bar_config(disable=True)
        pipe = pipeline.load(folder, device, dtype, steps=a.steps, guidance=7.5, height=res["size_px"])
    gen = lambda: ref("a photo of a cat", num_inference_steps=a.steps, guidance_scale=7.5,  # noqa: E731
                      height=res["size_px"], width=res["size_px"], generator=torch.Generator("cpu").manual_seed(0))
    with torch.no_grad():
        res["diffusers_s"] = round(median_time(gen, a.runs, device), 4)
        if cuda and not a.skip_compile:
            ref.unet.to(memory_format=torch.channels_last)
            ref.unet = torch.compile(ref.unet)
            res["diffusers_compiled_s"] = round(median_time(gen, a.runs, device), 4)
        ha = hyperalign_on(pipe, a.tiny)
        res["base_eager_s"] = round(median_time(ours(pipe, ha, None, None, 1), a.runs, device), 4)
        for v in ("I", "P", "S"):
            res[f"{v}_eager_x"] = round(median_time(ours(pipe, ha, v, None, 1), a.runs, device) / res["base_eager_s"], 3)
        fast = accel.Fast(pipe.backbone, accel.fast_targets(ha), "graph" if cuda else "eager")
        res["base_s"] = round(median_time(ours(pipe, ha, None, fast, 1), a.runs, device), 4)
        for v in ("I", "P", "S"):
            res[f"{v}_x"] = round(median_time(ours(pipe, ha, v, fast, 1), a.runs, device) / res["base_s"], 3)
        res["base_x_diffusers"] = round(res["base_s"] / res["diffusers_s"], 3)
        if "diffusers_compiled_s" in res:
            res["base_x_diffusers_compiled"] = round(res["base_s"] / res["diffusers_compiled_s"], 3)
        res["per_call"] = per_call(pipe, ha, fast, 5 * a.runs)
        fast.weights.reset()
        b4 = median_time(ours(pipe, ha, None, None, 4), a.runs, device)
        res["batch4"] = {"base_s": round(b4, 4), **{f"{v}_x": round(median_time(ours(pipe, ha, v, None, 4), a.runs,
                                                                                     device) / b4, 3)
                                                     for v in ("I", "P", "S")}}
        print(json.dumps(res), flush=True)
        res["flux_slice"] = flux_slice(device, dtype, a.runs, a.tiny)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
