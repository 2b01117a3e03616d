"""Export the LoRA a trained HyperAlign run makes for one prompt and seed, in the formats other tools load.

    python export_lora.py --hyper runs/hyperalign --prompt "a red circle left of a blue square" --seed 0 --out x.safetensors

A HyperAlign-I LoRA is a function of (prompt, x_T): this writes exactly the LoRA that `sample.py --hyper DIR --prompt P
--seed S` samples with (same settings, same x_T), so another program can sample that image without this code. P makes
a new LoRA at each key step and S at every step: one file per segment, named by its steps (OUT-steps-000-005.safetensors
holds the LoRA of steps 0 to 5). The safetensors metadata holds the prompt, seed, steps, guidance, size, variant,
steps covered and the base model.

Formats (--format):
  kohya      SD1.5: `lora_unet_<diffusers module path>.lora_down.weight` (2R, I), `.lora_up.weight` (O, 2R), `.alpha`
             (HyperAlign's LoRA has rank 2R at --rank R: hyperalign.HyperNet):
             what diffusers' `load_lora_weights` and ComfyUI's LoRA loader read. FLUX: the same layout with BFL module
             names (the fused `img_attn.qkv` kept whole), as sd-scripts writes FLUX LoRAs.
  diffusers  FLUX only: `transformer.<diffusers module path>.lora_A.weight` / `.lora_B.weight`, the fused BFL q|k|v
             split into to_q / to_k / to_v (add_q/k/v_proj for the text stream), the scale folded into lora_B.
Bad input: one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import os
import sys

import torch

import config
import files
import pipeline
import rundir
import runs
import sample

# BFL double-block names -> diffusers FluxTransformer2DModel names (the fused q|k|v -> three projections)
FLUX_SPLIT = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
FLUX_RENAME = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out"}


@torch.no_grad()
def segments(method, pipe, prompt: str, seed: int, negative: str = "") -> list[tuple[int, int, dict]]:
    """[(first step, last step, factors {target: (A (R, I), B (O, R))})] of one sample.py trajectory: sampled as
    sample.py samples it, with every LoRA the method makes kept."""
    cond, uncond = pipe.conds([prompt], negative)
    model = method.sampler_model(cond, pipe.steps)
    model.keep = True
    pipe.rollout(model, pipe.noise(1, torch.Generator("cpu").manual_seed(seed)), cond, uncond, trajectory=False)
    made = model.made                                              # [(step, factors)]
    ends = [s - 1 for s, _ in made[1:]] + [pipe.steps - 1]
    return [(s, e, {k: (A[0], B[0]) for k, (A, B) in f.items()}) for (s, f), e in zip(made, ends)]


def kohya(factors: dict, scale: float) -> dict[str, torch.Tensor]:
    """kohya / sd-scripts layout: Δθ = up @ down · alpha / rank."""
    out = {}
    for name, (A, B) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        out[f"{key}.lora_down.weight"] = A.contiguous()
        out[f"{key}.lora_up.weight"] = B.contiguous()
        out[f"{key}.alpha"] = torch.tensor(scale * A.shape[0])
    return out


def diffusers_flux(factors: dict, scale: float) -> dict[str, torch.Tensor]:
    """diffusers / PEFT layout for FluxTransformer2DModel: Δθ = lora_B @ lora_A (the scale in lora_B)."""
    out = {}
    for name, (A, B) in factors.items():
        block, _, layer = name.partition(".")[2].partition(".")                   # "double_blocks.N.img_attn.qkv"
        prefix = f"transformer.transformer_blocks.{block}."
        if layer in FLUX_SPLIT:
            for part, rows in zip(FLUX_SPLIT[layer], (scale * B).chunk(3, dim=0)):
                out[f"{prefix}{part}.lora_A.weight"] = A.clone()
                out[f"{prefix}{part}.lora_B.weight"] = rows.contiguous()
        elif layer in FLUX_RENAME:
            out[f"{prefix}{FLUX_RENAME[layer]}.lora_A.weight"] = A.contiguous()
            out[f"{prefix}{FLUX_RENAME[layer]}.lora_B.weight"] = (scale * B).contiguous()
        else:
            raise ValueError(f"--format diffusers: no diffusers name for the FLUX target {name!r}")
    return out


def export(args) -> list[str]:
    sample.run_defaults(args)
    pipe = pipeline.load(args.model, args.device, torch.float32, args.height, args.width, args.steps, args.guidance,
                         args.tokenizer, args.components)
    method, saved = runs.load_trained(args.hyper, pipe.backbone, args.device)
    if saved["method"] != "hyperalign":
        raise ValueError(f"--hyper {args.hyper}: a static LoRA run; its LoRA is the checkpoint itself")
    if args.format == "diffusers" and pipe.kind != "flow":
        raise ValueError("--format diffusers is for FLUX; SD1.5 LoRAs are written in kohya's layout, which diffusers "
                         "and ComfyUI read")
    segs = segments(method, pipe, args.prompt, args.seed, args.negative_prompt)
    stem, ext = os.path.splitext(args.out)
    paths = [args.out if len(segs) == 1 else f"{stem}-steps-{first:03d}-{last:03d}{ext}" for first, last, _ in segs]
    for path in paths:                                             # every file checked before the first is written
        rundir.check_output(path, args.overwrite)
    for path, (first, last, factors) in zip(paths, segs):
        tensors = (diffusers_flux if args.format == "diffusers" else kohya)(factors, method.cfg.scale)
        meta = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": str(args.seed),
                "steps": str(pipe.steps), "guidance": str(pipe.guidance), "height": str(pipe.height),
                "width": str(pipe.width), "variant": method.cfg.variant, "covers_steps": f"{first}-{last}",
                "base_model": os.path.abspath(args.model), "format": args.format, "hyperalign_run": args.hyper}
        files.save_tensors(path, tensors, metadata=meta)
    return paths


def main(argv=None) -> int:
    p = config.Parser(description=__doc__.split("\n")[0])
    p.add_argument("--hyper", required=True, help="a trained HyperAlign run folder (train.py --out DIR)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="OUT.safetensors (one segment) or its stem (several)")
    p.add_argument("--format", default="kohya", choices=("kohya", "diffusers"))
    p.add_argument("--overwrite", action="store_true", help="replace existing files (they are refused otherwise)")
    for flag in ("--model", "--tokenizer", "--components"):
        p.add_argument(flag, default=None, help="as sample.py (default: the run's)")
    for flag, kind in (("--steps", int), ("--guidance", float), ("--height", int), ("--width", int)):
        p.add_argument(flag, type=kind, default=None, help="as sample.py (default: the run's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    args.batch, args.eta = 1, 0.0

    def run() -> None:
        if not args.out.endswith(".safetensors"):
            raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
        sample.check_args(args, image_out=False)
        rundir.check_output(args.out, args.overwrite)
        print("wrote " + ", ".join(export(args)))
    return config.cli(run)


if __name__ == "__main__":
    sys.exit(main())
