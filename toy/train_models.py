"""Training the toy world's tiny models with the project's own modules (`python -m toy build`, see build.py).

  # ---- config    BuildConfig: every setting of the build, and its presets (full, smoke)
  # ---- data      an endless stream of renders; optimiser helpers
  # ---- CLIP      transformers CLIPModel trained contrastively on renders of train prompts (+ hard-negative twins)
  # ---- VAE       vae.AutoencoderKL (SD layout, 4 latent channels, x4 down-sampling): L1 + L2 + tiny KL
  # ---- U-Net     unet.UNet, eps-prediction on SD1.5's schedule, 10% caption dropout for classifier-free guidance
  # ---- FLUX      flux.Flux, rectified flow on the same latents packed 2x2 (schnell-style: no guidance embedding)

Each model's diffusers config.json lives beside its trainer, so the folders build.py writes are ordinary diffusers
folders. Shape alphabet: B batch, C channels, H W size, S text tokens (77), E text width, L image tokens.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from toy import data as toy_data
from toy import world

CLIP_CAPTION_NEGATIVES = ("flip", "swap", "count", "attribute")   # data.hard_negative kinds
CLIP_IMAGE_NEGATIVES = ("positions", "colours", "missing")       # data.hard_negative_image kinds


# ----------------------------------------------------------------------------------------------------------- config

@dataclass
class BuildConfig:
    seed: int = 0
    threads: int = 1                  # NOTE: 1 is fastest on a shared 2-core machine (OpenMP threads spin)
    # CLIP
    clip_steps: int = 3000
    clip_batch: int = 32               # renders; each with 4 hard-negative captions and 3 hard-negative renders
    clip_lr: float = 1e-3
    clip_width: int = 64               # text and vision width E; also the projection width
    clip_layers: tuple[int, int] = (2, 3)   # (text, vision) transformer layers
    # VAE
    vae_steps: int = 1200
    vae_batch: int = 24
    vae_lr: float = 3e-3
    vae_channels: tuple[int, ...] = (16, 32, 32)
    vae_kl: float = 1e-6
    # diffusion data: renders of train prompts encoded once
    latents: int = 16384
    # U-Net
    unet_steps: int = 850              # NOTE: short of convergence on purpose: the base model must leave something to align
    unet_batch: int = 64
    unet_lr: float = 2e-3
    cfg_dropout: float = 0.1
    # FLUX
    flux_steps: int = 2000
    flux_batch: int = 64
    flux_lr: float = 1e-3
    # preference model
    pref_pairs: int = 4000             # shipped in prefs.parquet
    pref_steps: int = 600
    # the toy ImageReward (composition-aware reward): a tiny BLIP ITM + ImageReward's MLP, Bradley-Terry on hard pairs
    ir_steps: int = 2000
    ir_batch: int = 32                 # renders per step
    ir_negatives: int = 3              # in-batch captions per render, besides the hard negatives
    ir_lr: float = 5e-4
    ir_width: int = 128                # vision and text width (2 heads of 64)
    ir_layers: tuple[int, int] = (3, 4)   # (vision, text) layers
    ir_patch: int = 8                  # ViT patch size (32 px images: 16 image tokens)
    # toy-comp: the toy CLIP fine-tuned on renderer preference pairs (as HPS v2 fine-tunes CLIP)
    comp_steps: int = 1000
    comp_batch: int = 32
    comp_lr: float = 1e-4
    # evaluation
    eval_prompts: int = 64             # per split
    eval_pairs: int = 300              # hard pairs per split and kind for the rewards' composition table
    sd_steps: int = 25                 # default sampling settings (also written in the folders' README figures)
    sd_cfg: float = 5.0
    flux_sample_steps: int = 25


PRESETS = {
    "full": BuildConfig(),
    # a few steps of everything: checks the whole pipeline end to end in a minute (not the shipped models)
    "smoke": BuildConfig(clip_steps=3, vae_steps=3, latents=256, unet_steps=3, flux_steps=3, pref_pairs=64,
                         pref_steps=3, ir_steps=3, ir_batch=8, comp_steps=3, comp_batch=8, eval_prompts=4, eval_pairs=8, sd_steps=2, flux_sample_steps=2),
}


# ------------------------------------------------------------------------------------------------------------- data

class Stream:
    """Renders of train prompts with ever-new seeds: an endless, reproducible data stream."""

    def __init__(self, seed: int, split: str = "train", singles: float = 0.0):
        self.rng, self.prompts, self.next_seed = random.Random(seed), world.prompts(split), seed * 10_000_000
        self.singles = singles      # probability of a one-object prompt (else uniform over all prompts of the split)

    def captions(self, n: int) -> list[str]:
        if not self.singles:
            return [self.rng.choice(self.prompts) for _ in range(n)]
        return [self.rng.choice(self.prompts[:18] if self.rng.random() < self.singles else self.prompts[18:])
                for _ in range(n)]

    def render(self, captions: list[str]) -> torch.Tensor:
        x = world.render_batch(captions, self.next_seed)  # (B, 3, H, W) in [0, 1]
        self.next_seed += len(captions)
        return x


def optimizer(params, lr: float, steps: int):
    """AdamW with a one-cycle schedule (5% warm-up): the recipe of every toy model."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1), pct_start=0.05)


def step(opt, sched, loss: torch.Tensor, clip: torch.nn.Module | None = None) -> None:
    """Backward, clip the gradient norm of `clip`'s parameters at 1 (if given), step the optimiser and schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
    opt.step()
    sched.step()


# ------------------------------------------------------------------------------------------------------------- CLIP

def clip_config(cfg: BuildConfig, vocab_size: int):
    from transformers import CLIPConfig
    E, (Lt, Lv) = cfg.clip_width, cfg.clip_layers
    text = dict(vocab_size=vocab_size, hidden_size=E, intermediate_size=4 * E, num_hidden_layers=Lt,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=E,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)   # pooled at the first <|endoftext|> (id 1)
    vision = dict(image_size=world.SIZE, patch_size=4, hidden_size=E, intermediate_size=4 * E, num_hidden_layers=Lv,
                  num_attention_heads=4, projection_dim=E)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=E)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> CLIP input, exactly as rewards.CLIPReward preprocesses them (OpenAI mean / std)."""
    from rewards import clip_preprocess
    return clip_preprocess(x, world.SIZE)


def train_clip(cfg: BuildConfig, tokenizer):
    """Symmetric InfoNCE (Radford et al. 2021) on (render, caption) pairs, with hard negatives on both sides.

    Every render is contrasted with the batch's captions and with hard negatives of its own caption (data.hard_negative:
    the relation flipped, the colours swapped, one object, an attribute changed); every caption with the batch's
    renders and with wrong renders of its own layout (data.hard_negative_image: the objects' positions or colours
    exchanged, one object missing). NOTE: toy world v1 trained with in-batch twins only; its text tower mapped
    "A left of B" and "A right of B" to nearly the same U-Net context (4% relative change, against 17% for
    "A above B"), and the models trained on it drew a relation's axis but not its direction (docs/results.md)."""
    from transformers import CLIPModel
    from rewards import pooled
    torch.manual_seed(cfg.seed)
    model = CLIPModel(clip_config(cfg, len(tokenizer)))
    opt, sched = optimizer(model.parameters(), cfg.clip_lr, cfg.clip_steps)
    data, rng = Stream(cfg.seed + 1), random.Random(cfg.seed + 2)
    B = cfg.clip_batch
    bar = tqdm(range(cfg.clip_steps), desc="CLIP")
    for _ in bar:
        caps = data.captions(B)
        seeds = list(range(data.next_seed, data.next_seed + B))
        images = data.render(caps)                                                      # (B, 3, H, W)
        neg_caps = [toy_data.hard_negative(c, k, rng)[0] for k in CLIP_CAPTION_NEGATIVES for c in caps]  # (K B)
        neg_images = torch.stack([toy_data.hard_negative_image(c, s, k, rng)
                                  for k in CLIP_IMAGE_NEGATIVES for c, s in zip(caps, seeds)])        # (J B, ...)
        # NOTE: 16 tokens while training: the text tower is causal and pools at the first EOS, so the features are
        # the same as with SD's 77-token padding and the positions after 16 are never used by the loss.
        f_txt = F.normalize(pooled(model.get_text_features(input_ids=world.tokenize(tokenizer, caps + neg_caps, 16))), dim=-1)
        f_img = F.normalize(pooled(model.get_image_features(pixel_values=pixels(torch.cat([images, neg_images])))), dim=-1)
        logits = model.logit_scale.exp() * f_img[:B] @ f_txt.T                          # (B, (1 + K) B)
        per_caption = model.logit_scale.exp() * f_txt[:B] @ f_img.T                     # (B, (1 + J) B)
        # a hard negative equal to another true caption of the batch is that caption's positive, not a negative
        dup = torch.tensor([[j != i and (caps + neg_caps)[j] == caps[i] for j in range(len(caps + neg_caps))]
                            for i in range(B)])
        target = torch.arange(B)
        loss = (F.cross_entropy(logits.masked_fill(dup, -1e4), target) + F.cross_entropy(per_caption, target)) / 2
        step(opt, sched, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False)


# -------------------------------------------------------------------------------------------------------------- VAE

def vae_diffusers_config(cfg: BuildConfig, scaling_factor: float = 1.0) -> dict:
    """The toy VAE as a diffusers AutoencoderKL config.json (SD layout; x4 down-sampling: three levels)."""
    n = len(cfg.vae_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(cfg.vae_channels), "layers_per_block": 1, "act_fn": "silu",
            "norm_num_groups": 8, "sample_size": world.SIZE, "scaling_factor": scaling_factor,
            "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True}


def train_vae(cfg: BuildConfig):
    """AutoencoderKL (Kingma & Welling 2014; Rombach et al. 2022): L1 + L2 reconstruction + a tiny KL to N(0, I).

    NOTE: no LPIPS / GAN terms (SD's VAE has both): the toy world is flat colours and sharp edges, which L1 + L2 fit.
    The scaling factor is set after training to 1 / std of the latent means, as SD's 0.18215 was.
    """
    from vae import AutoencoderKL, VAEConfig
    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(VAEConfig.from_diffusers(vae_diffusers_config(cfg)))
    opt, sched = optimizer(model.parameters(), cfg.vae_lr, cfg.vae_steps)
    data = Stream(cfg.seed + 3)
    bar = tqdm(range(cfg.vae_steps), desc="VAE")
    for _ in bar:
        x = data.render(data.captions(cfg.vae_batch)) * 2 - 1          # (B, 3, H, W) in [-1, 1]
        mean, logvar = model.encode_moments(x)                         # (B, 4, H/4, W/4) each
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()       # reparameterised posterior sample
        x_rec = model.decoder(model.post_quant_conv(z))
        rec = (x_rec - x).abs().mean() + (x_rec - x).square().mean()
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum((1, 2, 3)).mean()
        loss = rec + cfg.vae_kl * kl
        step(opt, sched, loss)
        bar.set_postfix(rec=f"{rec.item():.4f}", kl=f"{kl.item():.0f}")
    model.eval().requires_grad_(False)
    with torch.no_grad():
        mean, _ = model.encode_moments(data.render(data.captions(512)) * 2 - 1)
    scaling = round(1.0 / mean.std().item(), 5)
    final = AutoencoderKL(VAEConfig.from_diffusers(vae_diffusers_config(cfg, scaling)))
    final.load_state_dict(model.state_dict())
    return final.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(cfg: BuildConfig, vae, n: int) -> tuple[torch.Tensor, list[str]]:
    """n renders of train prompts -> scaled latents (n, 4, 8, 8) and their captions: the diffusion training set.

    NOTE: one-object prompts are 18 of the 684 train prompts; they are drawn 20% of the time so that the base models
    learn to draw one object when asked for one."""
    data, zs, caps = Stream(cfg.seed + 4, singles=0.2), [], []
    for _ in tqdm(range(0, n, 256), desc="encode"):
        c = data.captions(256)
        zs.append(vae.encode(data.render(c) * 2 - 1))
        caps += c
    return torch.cat(zs)[:n], caps[:n]


# ------------------------------------------------------------------------------------------------------------ U-Net

def unet_diffusers_config(cfg: BuildConfig) -> dict:
    """The toy U-Net as a diffusers UNet2DConditionModel config.json: SD1.5's blocks, two cross-attention levels."""
    return {"_class_name": "UNet2DConditionModel", "sample_size": world.SIZE // 4, "in_channels": 4, "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [32, 64, 64], "layers_per_block": 1,
            "attention_head_dim": 2,  # NOTE: diffusers' SD1.x naming: this is the number of heads
            "cross_attention_dim": cfg.clip_width, "norm_num_groups": 8, "norm_eps": 1e-5, "act_fn": "silu",
            "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False, "center_input_sample": False,
            "downsample_padding": 1, "mid_block_scale_factor": 1}


SCHEDULER_CONFIG = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                    "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
                    "trained_betas": None}


@torch.no_grad()
def text_contexts(text_encoder, tokenizer, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each distinct caption -> (last hidden state (77, E), pooled (E,)) of the frozen toy text encoder."""
    uniq = sorted(set(captions))
    out = {}
    for i in range(0, len(uniq), 256):
        o = text_encoder(world.tokenize(tokenizer, uniq[i:i + 256]))
        for j, c in enumerate(uniq[i:i + 256]):
            out[c] = (o.last_hidden_state[j], o.pooler_output[j])
    return out


def train_unet(cfg: BuildConfig, z0: torch.Tensor, caps: list[str], ctx: dict):
    """eps-prediction on SD1.5's schedule (Ho et al. 2020 eq. 14; Rombach et al. 2022 eq. 2): ||eps - eps_theta||^2.

    Captions are dropped to "" with probability cfg_dropout, so one model serves classifier-free guidance.
    """
    from sampler import VPSchedule, add_noise
    from unet import UNet, UNetConfig
    torch.manual_seed(cfg.seed)
    model = UNet(UNetConfig.from_diffusers(unet_diffusers_config(cfg)))
    schedule = VPSchedule.from_config(SCHEDULER_CONFIG)
    opt, sched = optimizer(model.parameters(), cfg.unet_lr, cfg.unet_steps)
    g = torch.Generator().manual_seed(cfg.seed + 5)
    bar = tqdm(range(cfg.unet_steps), desc="U-Net")
    for _ in bar:
        idx = torch.randint(len(z0), (cfg.unet_batch,), generator=g)
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.cfg_dropout
        context = torch.stack([ctx["" if d else caps[i]][0] for i, d in zip(idx.tolist(), drop.tolist())])
        t = torch.randint(schedule.T, (cfg.unet_batch,), generator=g)
        eps = torch.randn(z0[idx].shape, generator=g)
        x_t = add_noise(z0[idx], eps, schedule.alpha_bar[t].view(-1, 1, 1, 1))
        loss = F.mse_loss(model(x_t, t, context), eps)
        step(opt, sched, loss, model)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------------------- FLUX

def flux_diffusers_config(cfg: BuildConfig) -> dict:
    """The toy FLUX transformer as a diffusers FluxTransformer2DModel config.json (width 128 = 4 heads of 32)."""
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 16, "out_channels": 16,
            "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 32, "num_attention_heads": 4,
            "joint_attention_dim": cfg.clip_width, "pooled_projection_dim": cfg.clip_width,
            "guidance_embeds": False, "axes_dims_rope": [8, 12, 12]}


FLUX_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                         "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
                         "base_image_seq_len": 256, "max_image_seq_len": 4096}

# BFL -> diffusers names: the inverse of weights.FLUX_DIFFUSERS_RULES (fused q|k|v(|mlp) are split in flux_to_diffusers)
_TO_DIFFUSERS = [
    (r"^img_in\.", "x_embedder."), (r"^txt_in\.", "context_embedder."),
    (r"^time_in\.", "time_text_embed.timestep_embedder."), (r"^guidance_in\.", "time_text_embed.guidance_embedder."),
    (r"^vector_in\.", "time_text_embed.text_embedder."), (r"embedder\.in_layer\.", "embedder.linear_1."),
    (r"embedder\.out_layer\.", "embedder.linear_2."), (r"^double_blocks\.(\d+)\.", r"transformer_blocks.\1."),
    (r"^single_blocks\.(\d+)\.", r"single_transformer_blocks.\1."), (r"\.img_mod\.lin\.", ".norm1.linear."),
    (r"\.txt_mod\.lin\.", ".norm1_context.linear."), (r"\.img_attn\.norm\.(query|key)_norm\.scale$", r".attn.norm_\1."),
    (r"\.txt_attn\.norm\.(query|key)_norm\.scale$", r".attn.norm_added_\1."),
    (r"\.img_attn\.proj\.", ".attn.to_out.0."), (r"\.txt_attn\.proj\.", ".attn.to_add_out."),
    (r"\.img_mlp\.0\.", ".ff.net.0.proj."), (r"\.img_mlp\.2\.", ".ff.net.2."),
    (r"\.txt_mlp\.0\.", ".ff_context.net.0.proj."), (r"\.txt_mlp\.2\.", ".ff_context.net.2."),
    (r"\.modulation\.lin\.", ".norm.linear."), (r"\.norm\.(query|key)_norm\.scale$", r".attn.norm_\1."),
    (r"\.linear2\.", ".proj_out."), (r"^final_layer\.adaLN_modulation\.1\.", "norm_out.linear."),
    (r"^final_layer\.linear\.", "proj_out."), (r"_query\.$", "_q.weight"), (r"_key\.$", "_k.weight"),
]


def flux_to_diffusers(sd: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """BFL state dict -> diffusers FluxTransformer2DModel names (so the toy folder is an ordinary diffusers folder)."""
    out = {}
    for k, v in sd.items():
        if re.search(r"\.(img|txt)_attn\.qkv\.", k):        # fused q|k|v -> to_q/to_k/to_v or add_{q,k,v}_proj
            block, stream, kind = re.match(r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)$", k).groups()
            for name, part in zip("qkv", v.split(hidden)):
                sub = f"to_{name}" if stream == "img" else f"add_{name}_proj"
                out[f"transformer_blocks.{block}.attn.{sub}.{kind}"] = part
            continue
        if re.search(r"^single_blocks\.\d+\.linear1\.", k):  # fused q|k|v|mlp-in
            block, kind = re.match(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$", k).groups()
            q, kk, vv, mlp = v.split([hidden, hidden, hidden, v.shape[0] - 3 * hidden])
            for sub, part in (("attn.to_q", q), ("attn.to_k", kk), ("attn.to_v", vv), ("proj_mlp", mlp)):
                out[f"single_transformer_blocks.{block}.{sub}.{kind}"] = part
            continue
        for p, r in _TO_DIFFUSERS:
            k = re.sub(p, r, k)
        if k.startswith("norm_out.linear."):                 # BFL (shift, scale) -> diffusers (scale, shift)
            v = torch.cat(v.chunk(2)[::-1])
        out[k] = v.contiguous()
    return out


def train_flux(cfg: BuildConfig, z0: torch.Tensor, caps: list[str], ctx: dict):
    """Rectified flow (Liu et al. 2023; Esser et al. 2024): x_t = (1 - t) x0 + t eps, ||(eps - x0) - v_theta||^2.

    t ~ logit-normal(0, 1) as in SD3. NOTE: the toy FLUX is schnell-style (no guidance embedding, no caption
    dropout): the project's flow sampler has no classifier-free guidance, and guidance distillation (FLUX-dev) would
    need a second training stage. The CLIP text tower's hidden states stand in for T5's (txt), its pooled output for
    CLIP-L's (y).
    """
    from flux import Flux
    from sampler import image_ids, pack
    from weights_flux import flux_config_from_diffusers
    torch.manual_seed(cfg.seed)
    model = Flux(flux_config_from_diffusers(flux_diffusers_config(cfg)))
    opt, sched = optimizer(model.parameters(), cfg.flux_lr, cfg.flux_steps)
    g = torch.Generator().manual_seed(cfg.seed + 6)
    B, (H, W) = cfg.flux_batch, z0.shape[-2:]
    img_ids, txt_ids = image_ids(B, H, W), torch.zeros(B, 16, 3)
    bar = tqdm(range(cfg.flux_steps), desc="FLUX")
    for _ in bar:
        idx = torch.randint(len(z0), (B,), generator=g)
        txt = torch.stack([ctx[caps[i]][0][:16] for i in idx.tolist()])  # (B, 16, E): text_encoder_2's context
        y = torch.stack([ctx[caps[i]][1] for i in idx.tolist()])       # (B, E)
        x0 = pack(z0[idx])                                              # (B, L, 16)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(B, generator=g))
        x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
        loss = F.mse_loss(model(x_t, img_ids, txt, txt_ids, t, y), eps - x0)
        step(opt, sched, loss, model)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)
