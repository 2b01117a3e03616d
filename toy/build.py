"""`python -m toy build`: every shipped file under assets/toy/ rebuilt from scratch, reproducibly (fixed seeds,
fp32, CPU), in the real formats (diffusers folders, a transformers CLIPModel, Pick-a-Pic parquet).

Stages, in order (each reads the files of the earlier ones from the root folder):
  clip   the toy CLIP, and its text tower as the SD / FLUX text encoders        (train_models.py)
  vae    the SD-layout VAE                                                      (train_models.py)
  unet   the SD U-Net;  flux  the FLUX transformer                              (train_models.py)
  prefs  the preference pairs and the preference head                           (data.py, train_rewards.py)
  ir     the toy ImageReward, from renders and their hard negatives             (data.py, train_rewards.py)
  comp   toy-comp: the toy CLIP fine-tuned on renderer preference pairs        (data.py, train_rewards.py)
  eval   VAE PSNR, CLIP retrieval, judge accuracy of the base models; grids     (evaluate.py)
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, replace

import torch

import files
import weights
from toy import data, evaluate, train_models, train_rewards, world
from toy.train_models import (FLUX_SCHEDULER_CONFIG, PRESETS, SCHEDULER_CONFIG, BuildConfig, flux_diffusers_config,
                              flux_to_diffusers, unet_diffusers_config, vae_diffusers_config)

def _json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.write_json(path, obj)


def save_folder(module_or_sd, folder: str, config: dict, name: str = "diffusion_pytorch_model.safetensors") -> None:
    """A model folder: weights (safetensors) + config.json."""
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    os.makedirs(folder, exist_ok=True)
    files.save_tensors(os.path.join(folder, name), sd)
    _json(os.path.join(folder, "config.json"), config)


def save_text_encoders(clip, root: str) -> None:
    """The CLIP text tower as SD's text_encoder/ and FLUX's text_encoder/ (pooled y) + text_encoder_2/ (txt).

    NOTE: FLUX's text_encoder_2 (T5 in FLUX.1) is the same tower with its position table cut to 16 entries: the tower
    is causal, so its first 16 hidden states are unchanged, and FLUX attends over 16 text tokens instead of 77
    (FLUX.1 likewise gives T5 a shorter context than its maximum: 256 tokens for schnell).
    """
    from transformers import CLIPTextModel
    text = CLIPTextModel(clip.config.text_config)
    text.load_state_dict(clip.text_model.state_dict())
    for sub in ("sd/text_encoder", "flux/text_encoder"):
        text.save_pretrained(os.path.join(root, sub))
    short_cfg = clip.config.text_config.__class__.from_dict({**clip.config.text_config.to_dict(),
                                                             "max_position_embeddings": 16})
    short = CLIPTextModel(short_cfg)
    sd = {k: v for k, v in clip.text_model.state_dict().items() if not k.endswith("position_ids")}
    sd["embeddings.position_embedding.weight"] = sd["embeddings.position_embedding.weight"][:16]
    short.load_state_dict(sd)
    short.save_pretrained(os.path.join(root, "flux/text_encoder_2"))
    for sub in ("clip", "sd/tokenizer", "flux/tokenizer", "flux/tokenizer_2"):
        world.write_tokenizer(os.path.join(root, sub))


def save_sd(cfg: BuildConfig, unet, folder: str) -> None:
    """unet/ + scheduler/ + model_index.json: with text_encoder/, tokenizer/, vae/ a diffusers SD pipeline folder."""
    save_folder(unet, os.path.join(folder, "unet"), unet_diffusers_config(cfg))
    _json(os.path.join(folder, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIG)
    _json(os.path.join(folder, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False})


def save_flux(cfg: BuildConfig, flux, folder: str) -> None:
    """transformer/ (diffusers names) + scheduler/ + model_index.json: a diffusers FLUX pipeline folder."""
    save_folder(flux_to_diffusers(flux.state_dict(), flux.config.hidden_size), os.path.join(folder, "transformer"),
          flux_diffusers_config(cfg))
    _json(os.path.join(folder, "scheduler", "scheduler_config.json"), FLUX_SCHEDULER_CONFIG)
    _json(os.path.join(folder, "model_index.json"), {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        # NOTE: a CLIP text tower stands in for T5-XXL (see save_text_encoders)
        "text_encoder_2": ["transformers", "CLIPTextModel"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})


STAGES = ("clip", "vae", "unet", "flux", "prefs", "ir", "comp", "eval")


def build(preset: str = "full", root: str = world.ROOT, stages: tuple[str, ...] = STAGES, threads: int | None = None
          ) -> dict:
    """Rebuild the shipped files under `root`, stage by stage; a stage loads earlier stages' files from `root`."""
    cfg, t_all, mine = PRESETS[preset], time.time(), {}
    if threads:
        cfg = replace(cfg, threads=threads)
    torch.set_num_threads(cfg.threads)
    mine["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    for stage in stages:
        t0 = time.time()
        print(f"---- {stage}", flush=True)
        if stage == "clip":
            world.write_tokenizer(os.path.join(root, "clip"))
            tokenizer = world.load_tokenizer(os.path.join(root, "clip"))
            clip = train_models.train_clip(cfg, tokenizer)
            clip.save_pretrained(os.path.join(root, "clip"))
            save_text_encoders(clip, root)
            mine.update(clip_top1_heldout=evaluate.clip_retrieval(clip, tokenizer, "heldout"),
                        clip_top1_train=evaluate.clip_retrieval(clip, tokenizer, "train"))
        elif stage == "vae":
            vae = train_models.train_vae(cfg)
            for sub in ("sd/vae", "flux/vae"):
                save_folder(vae, os.path.join(root, sub), vae_diffusers_config(cfg, vae.config.scaling_factor))
            mine.update(vae_psnr_heldout=evaluate.vae_psnr(vae, "heldout"),
                        vae_scaling_factor=vae.config.scaling_factor)
        elif stage in ("unet", "flux"):
            z0, caps = train_models.encode_dataset(cfg, weights.load_vae(os.path.join(root, "sd", "vae")), cfg.latents)
            ctx = train_models.text_contexts(weights.load_text_encoder(os.path.join(root, "sd", "text_encoder")),
                                             weights.load_tokenizer(os.path.join(root, "sd", "tokenizer")), caps + [""])
            if stage == "unet":
                save_sd(cfg, train_models.train_unet(cfg, z0, caps, ctx), os.path.join(root, "sd"))
            else:
                save_flux(cfg, train_models.train_flux(cfg, z0, caps, ctx), os.path.join(root, "flux"))
        elif stage == "prefs":
            pairs = data.make_pairs(cfg.pref_pairs, "train", cfg.seed + 7)
            data.write_prefs_parquet(pairs, os.path.join(root, "prefs.parquet"), cfg.seed + 8)
            head, figures = train_rewards.train_preference_head(cfg, os.path.join(root, "clip"), pairs)
            save_folder(head, os.path.join(root, "pref"), {"clip": "../clip", "width": cfg.clip_width},
                        "model.safetensors")
            mine.update(figures)
        elif stage == "ir":
            import imagereward
            folder = os.path.join(root, "ir")
            train_rewards.write_bert_tokenizer(os.path.join(folder, "tokenizer"))
            reward, figures = train_rewards.train_image_reward(cfg, os.path.join(folder, "tokenizer"))
            sd = weights.rename(reward.model.state_dict(), imagereward.TO_RELEASE)      # the released layout
            files.save_torch(os.path.join(folder, "ImageReward.pt"), {k: v.contiguous() for k, v in sd.items()})
            _json(os.path.join(folder, "config.json"), {"vision_heads": 2, "text_heads": 2, "mean": reward.mean,
                                                        "std": reward.std})
            mine.update(figures)
        elif stage == "comp":
            from toy.rewards import save_comp
            reward, figures = train_rewards.train_comp_reward(cfg, os.path.join(root, "clip"))
            save_comp(reward, os.path.join(root, "comp"))
            mine.update(figures)
        elif stage == "eval":
            mine.update(evaluate.evaluate(cfg, root))
        else:
            raise ValueError(f"unknown stage {stage!r}")
        mine[f"time_{stage}_s"] = round(time.time() - t0, 1)
        # NOTE: stages may run in parallel processes: merge this process's figures into the file as it is now
        path = os.path.join(root, "metrics.json")
        _json(path, {**(files.read_json(path) if os.path.isfile(path) else {}), **mine})
        print({k: v for k, v in mine.items() if k != "config"}, flush=True)
    print(f"built {stages} in {time.time() - t_all:.0f} s", flush=True)
    return mine


def main(argv: list[str] | None = None) -> int:
    """`python -m toy build [--preset full|smoke] [--root DIR] [--stages clip,vae,...]`: rebuild the shipped files."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m toy", description="Rebuild the toy world's shipped models and data "
                                "(assets/toy/).")
    p.add_argument("command", choices=["build"])
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--root", default=world.ROOT)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default 1: fastest on a busy machine)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}; later stages read earlier ones' files")
    a = p.parse_args(argv)
    stages = tuple(s for s in a.stages.split(",") if s)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        print(f"error: --stages: unknown {bad}; known: {','.join(STAGES)}", file=sys.stderr)
        return 2
    build(a.preset, a.root, stages, a.threads)
    return 0
