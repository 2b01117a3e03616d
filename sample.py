"""Text-to-image sampling from the command line.

    python sample.py --model PATH --prompt "a cat" [--negative-prompt N] --seed 0 --steps 50 --guidance 7.5 \
                     --height 512 --width 512 [--batch 1] --out cat.png

PATH: a diffusers SD1.x folder (model_index.json), or an SD1.5 single file (.safetensors, with --tokenizer FOLDER);
or a diffusers FLUX folder, or a BFL FLUX single file (flux1-dev.safetensors, with --components FOLDER: a diffusers
FLUX folder for the VAE and text encoders). The architecture is detected (or --arch). FLUX: guidance-distilled (dev,
--guidance is the distilled scale, default 3.5) or plain (schnell); no negative prompt.
Seeded exactly like diffusers (a CPU torch.Generator, then one randn of the latent shape), so on a diffusers SD
folder with a DDIM scheduler the image equals StableDiffusionPipeline's for the same seed. The pipeline's scheduler
settings (betas, spacing, offset, prediction type) drive our DDIM sampler whatever scheduler class the folder names.
Bad input: one line `error: ...` on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import numpy as np
import torch

import sampler
import weights
from weights import WeightsError


def detect_arch(path: str) -> str:
    """'sd' or 'flux', from a pipeline folder's model_index.json or a single file's keys."""
    if not os.path.exists(path):
        raise WeightsError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise WeightsError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        with open(index) as f:
            name = json.load(f).get("_class_name", "")
        return "flux" if "Flux" in name else "sd"
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        raise WeightsError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        return "sd"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "flux"
    raise WeightsError(f"{path}: neither an SD1.5 (model.diffusion_model.input_blocks.*) nor a FLUX checkpoint")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as diffusers' postprocess does."""
    x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


@torch.no_grad()
def sample_sd(pipe: weights.SDPipeline, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 50,
              guidance: float = 7.5, height: int = 512, width: int = 512, batch: int = 1, eta: float = 0.0,
              wrap: Callable[[Callable], Callable] | None = None, progress: bool = True) -> np.ndarray:
    """SD1.x text-to-image: CLIP context, DDIM with classifier-free guidance, VAE decode -> (B, H, W, 3) uint8.

    `wrap(model) -> model` may replace the U-Net callable `model(x_t, t, context) -> eps` (e.g. a hypernetwork
    that adds per-step LoRA weights).
    """
    unet, vae = pipe.unet, pipe.vae
    param = next(unet.parameters())
    f = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE down-sampling factor (8 for SD)
    context = pipe.encode_prompt([prompt]).to(param.dtype).repeat(batch, 1, 1)  # (B, 77, D)
    uncond = pipe.encode_prompt([negative_prompt]).to(param.dtype).repeat(batch, 1, 1) if guidance > 1 else None
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, unet.config.in_channels, height // f, width // f)
    x_T = torch.randn(shape, generator=generator, dtype=param.dtype).to(param.device)  # as diffusers' randn_tensor
    model = wrap(unet) if wrap is not None else unet
    x_0 = sampler.ddim_sample(model, x_T, context, sampler.VPSchedule.from_config(pipe.scheduler), steps, uncond=uncond,
                              guidance=guidance, eta=eta, generator=generator, progress=progress)
    return to_uint8(vae.decode(x_0.to(next(vae.parameters()).dtype)))


@torch.no_grad()
def sample_flux(pipe: weights.FluxPipe, prompt: str, seed: int = 0, steps: int = 50, guidance: float = 3.5,
                height: int = 1024, width: int = 1024, batch: int = 1,
                wrap: Callable[[Callable, dict], Callable] | None = None, progress: bool = True) -> np.ndarray:
    """FLUX text-to-image: T5 + CLIP-pooled text, rectified-flow Euler sampling, VAE decode -> (B, H, W, 3) uint8.

    Seeded as FluxPipeline (CPU generator, one randn of the unpacked latent shape in the model dtype). `wrap(model,
    cond) -> model` may replace the callable `model(x_t, t, cond) -> v` (e.g. a HyperAlign hypernetwork).
    """
    flux, vae = pipe.transformer, pipe.vae
    param = next(flux.parameters())
    f = 2 ** (len(vae.config.block_out_channels) - 1)  # VAE down-sampling factor (8 for FLUX)
    if height % (2 * f) or width % (2 * f):
        raise ValueError(f"FLUX needs --height and --width that are multiples of {2 * f}, got {height}x{width}")
    h, w = height // f, width // f  # latent size
    txt, y = pipe.encode([prompt])
    txt, y = txt.repeat(batch, 1, 1), y.repeat(batch, 1)
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((batch, flux.config.in_channels // 4, h, w), generator=generator, dtype=param.dtype)
    x_T = sampler.pack(noise.float().to(param.device))  # NOTE: Euler steps in float32 whatever the model dtype
    cond = sampler.flux_cond(txt, y, sampler.image_ids(batch, h, w, param.device),
                             guidance if flux.config.guidance_embed else None)
    model = sampler.flux_model_fn(flux)
    model = wrap(model, cond) if wrap is not None else model
    x_0 = sampler.flow_sample(model, x_T, cond, steps, shift=pipe.shift, progress=progress)
    return to_uint8(vae.decode(sampler.unpack(x_0, h, w).to(next(vae.parameters()).dtype)))


def hyper_wrap_flux(folder: str, pipe: weights.FluxPipe, device) -> Callable:
    """`wrap` for sample_flux: the FLUX callable modulated by a trained HyperAlign hypernetwork (hyperalign.py)."""
    import hyperalign
    ha, _ = hyperalign.load(folder, hyperalign.Backbone("flow", pipe.transformer), device)
    return lambda model, cond: ha.sampler_model(cond)


def hyper_wrap(folder: str, pipe: weights.SDPipeline, prompt: str, batch: int, device) -> Callable:
    """`wrap` for sample_sd: the U-Net callable modulated by a trained HyperAlign hypernetwork (hyperalign.py)."""
    import hyperalign
    backbone = hyperalign.Backbone("vp", pipe.unet, sampler.VPSchedule.from_config(pipe.scheduler))
    ha, _ = hyperalign.load(folder, backbone, device)
    context = pipe.encode_prompt([prompt]).to(next(pipe.unet.parameters()).dtype).repeat(batch, 1, 1)
    return lambda unet: ha.sampler_model(context)


def default_size(model: str, arch: str, components: str | None = None) -> int:
    """Image size when --height/--width are not given: the pipeline VAE config's `sample_size` (as diffusers reads
    it: 512 for SD1.5, 1024 for FLUX.1, 32 for the toy models), else 512 (SD) or 1024 (FLUX)."""
    vae_config = os.path.join(components or model, "vae", "config.json")
    if os.path.isfile(vae_config):
        with open(vae_config) as f:
            size = json.load(f).get("sample_size")
        if isinstance(size, int):
            return size
    return 1024 if arch == "flux" else 512


def save_images(images: np.ndarray, out: str) -> list[str]:
    """One file per image: OUT for a single image, OUT-stem-{i}.ext for a batch."""
    from PIL import Image
    stem, ext = os.path.splitext(out)
    paths = [out] if len(images) == 1 else [f"{stem}-{i}{ext}" for i in range(len(images))]
    for image, path in zip(images, paths):
        Image.fromarray(image).save(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder or SD1.5 .safetensors single file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="default: 7.5 (SD, CFG), 3.5 (FLUX, distilled)")
    p.add_argument("--height", type=int, default=None, help="default: the VAE config's sample_size (SD1.5 512, "
                   "FLUX 1024, toy 32), else 512 (SD) / 1024 (FLUX)")
    p.add_argument("--width", type=int, default=None, help="default: as --height")
    p.add_argument("--batch", type=int, default=1, help="images for the prompt (latents drawn in one randn)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--out", required=True, help="output image (.png/.jpg/.webp); a batch writes OUT-0.png, ...")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder, for a single-file checkpoint")
    p.add_argument("--components", default=None, help="diffusers FLUX folder (vae, text encoders), for a FLUX file")
    p.add_argument("--arch", default=None, choices=["sd", "flux"], help="default: detected from --model")
    p.add_argument("--hyper", default=None, help="a trained HyperAlign folder (train.py --out DIR): sample with its "
                   "LoRA weights; the variant (S / I / P) comes from DIR/config.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    for name in ("steps", "batch", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if (args.height or 8) % 8 or (args.width or 8) % 8:
        raise ValueError(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
    if (args.guidance is not None and args.guidance < 0) or args.eta < 0:
        raise ValueError("--guidance and --eta must be >= 0")
    if os.path.splitext(args.out)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out must end in .png, .jpg or .webp, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out folder does not exist: {folder}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # argparse itself prints `error: ...` and exits 2 on malformed arguments
    try:
        check_args(args)
        dtype = getattr(torch, args.dtype) if args.dtype else \
            (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
        arch = args.arch or detect_arch(args.model)
        size = default_size(args.model, arch, args.components)
        args.height, args.width = args.height or size, args.width or size
        if arch == "flux":
            if args.negative_prompt or args.eta:
                raise ValueError("FLUX samples without CFG or DDIM noise: --negative-prompt and --eta do not apply")
            if not os.path.isdir(args.model) and not args.components:
                raise ValueError(f"{args.model} holds only the FLUX transformer: pass --components FOLDER, a "
                                 "diffusers FLUX folder with vae/, text_encoder(_2)/, tokenizer(_2)/")
            pipe = weights.load_flux_pipeline(args.components or args.model, dtype=dtype, device=args.device,
                                              transformer=None if os.path.isdir(args.model) else args.model)
            wrap = hyper_wrap_flux(args.hyper, pipe, args.device) if args.hyper else None
            images = sample_flux(pipe, args.prompt, args.seed, args.steps, 3.5 if args.guidance is None else
                                 args.guidance, args.height, args.width, args.batch, wrap=wrap)
        else:
            pipe = weights.load_sd(args.model, dtype=dtype, device=args.device, tokenizer=args.tokenizer)
            wrap = hyper_wrap(args.hyper, pipe, args.prompt, args.batch, args.device) if args.hyper else None
            images = sample_sd(pipe, args.prompt, args.negative_prompt, args.seed, args.steps,
                               7.5 if args.guidance is None else args.guidance, args.height, args.width,
                               args.batch, args.eta, wrap=wrap)
        paths = save_images(images, args.out)
    except (ValueError, OSError) as e:  # WeightsError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
