"""Tiny SD1.5-shaped models and pipeline folders for the SD tests (diffusers is the oracle; nothing is downloaded)."""
import json
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD15_DDIM = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                 prediction_type="epsilon")
UNET = dict(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
            cross_attention_dim=64, sample_size=16)
VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
# NOTE: head dim 64, so a single-file loader (which infers heads = width / 64) reads this config back
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64)


def randomise(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def byte_chars() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes as themselves, the rest shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def write_tokenizer(folder: str) -> CLIPTokenizer:
    """A real CLIPTokenizer with a byte-level vocabulary (every byte, alone and word-final) and a few merges."""
    os.makedirs(folder, exist_ok=True)
    chars = byte_chars()
    merges = ["t h", "th e</w>", "a n", "an d</w>", "c a", "ca t</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)
    return tok


def tiny_parts(tokenizer: CLIPTokenizer):
    torch.manual_seed(0)
    unet = randomise(UNet2DConditionModel(**UNET)).eval()
    vae = randomise(AutoencoderKL(**VAE)).eval()
    text_encoder = randomise(CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT))).eval()
    return unet, vae, text_encoder


def write_pipeline(folder: str) -> StableDiffusionPipeline:
    """A diffusers SD pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    tokenizer = write_tokenizer(os.path.join(folder, "tokenizer"))
    unet, vae, text_encoder = tiny_parts(tokenizer)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_DDIM), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
