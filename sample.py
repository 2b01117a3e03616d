"""Text-to-image sampling from the command line, with or without a trained HyperAlign (or static-LoRA) run.

    python sample.py --model PATH --prompt "a cat" [--negative-prompt N] --seed 0 --steps 50 --guidance 7.5 \
                     --height 512 --width 512 [--batch 1] --out cat.png
    python sample.py --hyper runs/hyperalign --prompt "a red circle left of a blue square" --out x.png

PATH: a diffusers SD1.x folder (model_index.json), or an SD1.5 single file (.safetensors, with --tokenizer FOLDER);
or a diffusers FLUX folder, or a BFL FLUX single file (flux1-dev.safetensors, with --components FOLDER: a diffusers
FLUX folder for the VAE and text encoders). FLUX: guidance-distilled (dev, --guidance is the distilled scale, default
3.5) or plain (schnell); no negative prompt. With --hyper DIR, the model, steps, guidance and size default to the
run's own (DIR/config.json), and the variant (S / I / P) and P's key steps come from it too.
Seeded exactly like diffusers (a CPU torch.Generator, then one randn of the latent shape), so on a diffusers SD
folder with a DDIM scheduler the image equals StableDiffusionPipeline's for the same seed.
Bad input: one line `error: ...` on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import accel
import config
import files
import pipeline
import rundir
import runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = config.Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers pipeline folder or single file (default: the --hyper "
                   "run's model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the run's, else SD 50 / FLUX 28")
    p.add_argument("--guidance", type=float, default=None, help="default: the run's, else 7.5 (SD, CFG), 3.5 (FLUX)")
    p.add_argument("--height", type=int, default=None, help="default: the run's, else the VAE config's sample_size "
                   "(SD1.5 512, FLUX 1024, toy 32)")
    p.add_argument("--width", type=int, default=None, help="default: as --height")
    p.add_argument("--batch", type=int, default=1, help="images for the prompt (latents drawn in one randn)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--out", required=True, help="output image (.png/.jpg/.webp); a batch writes OUT-0.png, ...")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (it is refused otherwise)")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder, for a single-file SD checkpoint")
    p.add_argument("--components", default=None, help="diffusers FLUX folder (vae, text encoders), for a FLUX file")
    p.add_argument("--hyper", default=None, help="a trained run folder (train.py / baselines.py --out DIR)")
    p.add_argument("--fast", default=None, choices=accel.MODES, help="the fast path (accel.py): graph = CUDA graphs, "
                   "compile = torch.compile, eager = the same static weights uncaptured; one image at a time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace, image_out: bool = True) -> None:
    """Refuse bad flags before anything is loaded (image_out: --out is an image this script writes)."""
    for name in ("steps", "batch", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if (args.height or 8) % 8 or (args.width or 8) % 8:
        raise ValueError(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
    for name in ("guidance", "eta"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v >= 0):      # NaN would turn guidance off silently
            raise ValueError(f"--{name} must be a finite number >= 0, got {v}")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ValueError(f"--out folder does not exist: {folder}")
    if image_out:
        if os.path.splitext(args.out)[1].lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            raise ValueError(f"--out must end in .png, .jpg or .webp, got {args.out!r}")
        for path in out_paths(args.out, args.batch):
            rundir.check_output(path, args.overwrite)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    if args.model is None and args.hyper is None:
        raise ValueError("--model is required (or --hyper DIR, whose run names its model)")


def out_paths(out: str, n: int) -> list[str]:
    """The images a sample of n writes: OUT itself for one, OUT-0.png, OUT-1.png, ... for several."""
    stem, ext = os.path.splitext(out)
    return [out] if n == 1 else [f"{stem}-{i}{ext}" for i in range(n)]


def run_defaults(args: argparse.Namespace) -> None:
    """Fill what was not given from the --hyper run's config.json (its model and sampling settings)."""
    if not os.path.isdir(args.hyper):
        raise rundir.RunError(f"--hyper {args.hyper}: no such run folder")
    saved = rundir.read_config(args.hyper).get("run", {})
    args.model = args.model or saved.get("model")
    args.tokenizer = args.tokenizer or saved.get("tokenizer")
    args.steps = args.steps or saved.get("sample_steps")
    args.guidance = saved.get("guidance") if args.guidance is None else args.guidance
    args.height = args.height or saved.get("resolution")
    args.width = args.width or saved.get("resolution")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded as diffusers' postprocess does."""
    if not torch.isfinite(images).all():
        raise ValueError("the sampled image is not finite (NaN or inf): nothing written")
    return (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # argparse itself prints `error: ...` and exits 2 on malformed arguments
    return config.cli(lambda: sample(args))


def sample(args: argparse.Namespace) -> None:
    """Check the flags, load, sample, write the images."""
    check_args(args)
    if args.hyper:
        run_defaults(args)
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    pipe = pipeline.load(args.model, args.device, dtype, args.height, args.width, args.steps, args.guidance,
                         args.tokenizer, args.components)
    if pipe.kind == "flow" and (args.negative_prompt or args.eta):
        raise ValueError("FLUX samples without CFG or DDIM noise: --negative-prompt and --eta do not apply")
    f = 2 * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if pipe.kind == "flow" and (pipe.height % f or pipe.width % f):
        raise ValueError(f"FLUX needs --height and --width that are multiples of {f}, got "
                         f"{pipe.height}x{pipe.width}")
    prompts = [args.prompt] * args.batch
    cond, uncond = pipe.conds(prompts, args.negative_prompt)
    method = runs.load_trained(args.hyper, pipe.backbone, args.device)[0] if args.hyper else None
    fast = None
    if args.fast:
        if args.batch != 1:
            raise ValueError("--fast samples one image at a time: use --batch 1")
        fast = accel.Fast(pipe.backbone, accel.fast_targets(method) if method else [], args.fast)
    model = method.sampler_model(cond, pipe.steps, fast=fast) if method else (fast or pipe.backbone)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    x_T = pipe.noise(args.batch, generator)
    x_0 = pipe.rollout(model, x_T, cond, uncond, args.eta, generator, trajectory=False, progress=True)
    images = to_uint8(pipe.decode(x_0))
    paths = out_paths(args.out, len(images))
    for image, path in zip(images, paths):
        files.save_image(path, Image.fromarray(image))
    print("wrote " + ", ".join(paths))


if __name__ == "__main__":
    sys.exit(main())
