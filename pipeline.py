"""The one frozen text-to-image pipeline: SD1.x (VP diffusion, DDIM + CFG) or FLUX (rectified flow, Euler).

    pipe = pipeline.load(PATH)                      any supported checkpoint (folders, single files), strictly
    cond, uncond = pipe.conds(prompts)              text conditioning (uncond None without classifier-free guidance)
    x_T = pipe.noise(n, generator)                  seeded as diffusers does (a CPU generator, one randn)
    traj = pipe.rollout(model, x_T, cond, uncond)   the sampler over any model callable: x_t and x0_hat per step
    images = pipe.decode(x0)                        latents -> images in [0, 1]; pipe.encode: images -> latents
    images = pipe.generate(prompts, x_T, model)     all of the above in one call

It knows nothing of LoRA or hypernetworks: the method (hyperalign.py, methods.py) hands it a model callable
`model(x_t, t, cond) -> prediction`, and the base model is `pipe.backbone` itself.

Shape alphabet: B batch, C latent channels, H W latent size, L packed tokens, S text tokens, E text width.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

import sampler
import weights
import weights_flux
from backbone import VP, Backbone, Flow
from weights import WeightsError


# ---------------------------------------------------------------------------------------------------- text encoders

@dataclass
class SDText:
    """SD1.x prompt encoder: prompts -> context (B, 77, E), CLIP's last hidden state; longer prompts are truncated
    with a warning (as diffusers does)."""
    encoder: nn.Module
    tokenizer: object

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        max_length = min(self.tokenizer.model_max_length, self.encoder.config.max_position_embeddings)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        for p, n in zip(prompts, (len(i) for i in self.tokenizer(prompts).input_ids)):
            if n > max_length:
                warnings.warn(f"prompt truncated to {max_length} tokens (it has {n}): {p[:60]!r}...", stacklevel=2)
        return self.encoder(ids.to(next(self.encoder.parameters()).device))[0]      # (B, 77, E)


@dataclass
class FluxText:
    """FLUX prompt encoder: prompts -> (txt (B, S, E) T5's last hidden state, y (B, E') CLIP-L's pooled output)."""
    clip: nn.Module
    clip_tokenizer: object
    t5: nn.Module                 # T5EncoderModel (or a small CLIPTextModel standing in for it in toy folders)
    t5_tokenizer: object
    max_length: int = 512         # T5 tokens

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        ids = self.clip_tokenizer(prompts, padding="max_length", max_length=self.clip_tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        y = self.clip(ids.to(next(self.clip.parameters()).device)).pooler_output
        # a CLIP standing in for T5 has learned positions: never ask for more tokens than it has
        max_length = min(self.max_length, getattr(self.t5.config, "max_position_embeddings", self.max_length))
        ids = self.t5_tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                                return_tensors="pt").input_ids
        return self.t5(ids.to(next(self.t5.parameters()).device)).last_hidden_state, y


# --------------------------------------------------------------------------------------------------------- pipeline

@dataclass
class Pipeline:
    backbone: Backbone            # the frozen generator (U-Net or FLUX) and its process
    vae: nn.Module
    text: Callable                # vp: prompts -> context (B, S, E); flow: prompts -> (txt, y)
    height: int                   # image size in pixels
    width: int
    steps: int                    # sampling steps N
    guidance: float               # vp: CFG scale; flow: distilled guidance (dev) or unused (schnell)
    shift: bool = True            # flow: resolution-dependent schedule shift (dev) or none (schnell)

    @property
    def kind(self) -> str:
        return self.backbone.kind

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def resolution(self) -> int:
        """The square training resolution (preference images are cropped to it)."""
        if self.height != self.width:
            raise ValueError(f"training needs square images, this pipeline makes {self.height}x{self.width}")
        return self.height

    def latent_hw(self) -> tuple[int, int]:
        f = 2 ** (len(self.vae.config.block_out_channels) - 1)             # the VAE's down-sampling factor (8 for SD)
        return self.height // f, self.width // f

    def conds(self, prompts: list[str], negative: str = ""):
        """(cond, uncond) for a batch of prompts; uncond None when there is no classifier-free guidance."""
        return self.backbone.conds(self.text, prompts, negative, self.guidance, self.latent_hw())

    def noise(self, n: int, generator: torch.Generator, device=None) -> Tensor:
        """x_T: one randn of the latent shape in the model's dtype on a CPU generator (diffusers' seeding), kept in
        float32, in model space (packed 2x2 for FLUX)."""
        h, w = self.latent_hw()
        z = torch.randn(n, self.vae.config.latent_channels, h, w, generator=generator, dtype=self.backbone.dtype)
        return self.backbone.to_model(z.float().to(device or self.device))

    def pairs(self) -> list[tuple]:
        """[(t, t_next)] model times of the N sampler updates (VP: integer timesteps; flow: times in [0, 1])."""
        return self.backbone.pairs(self.steps, self.latent_hw(), self.shift)

    def timesteps(self) -> list:
        return [t for t, _ in self.pairs()]

    def t_batch(self, t, n: int, device=None) -> Tensor:
        """One model time for n samples, as the model takes it: (n,)."""
        return self.t_each([t] * n, device)

    def t_each(self, ts: list, device=None) -> Tensor:
        """A model time per sample: (n,)."""
        return torch.tensor(ts, device=device or self.device, dtype=self.backbone.t_dtype)

    def step(self, x_t: Tensor, pred: Tensor, t, t_next, eta: float = 0.0, generator=None) -> tuple[Tensor, Tensor]:
        """One sampler update x_t -> x_{t_next} from the model's prediction: (x_next, x0_hat)."""
        return self.backbone.step(x_t, pred, t, t_next, eta, generator)

    def rollout(self, model: Callable, x_T: Tensor, cond, uncond=None, eta: float = 0.0, generator=None,
                trajectory: bool = True, progress: bool = False):
        """Sample from x_T with `model(x_t, t, cond)`. trajectory: {"t": [N], "x_t": (N+1, B, ...) from x_T to x_0,
        "x0_hat": (N, B, ...)}; else x_0."""
        with torch.no_grad():
            out = self.backbone.sample(model, x_T, cond, uncond, self.steps, self.guidance, self.shift, eta,
                                       generator, trajectory, progress)
        return dict(out[1], t=out[1]["t"].tolist()) if trajectory else out

    def decode(self, x0: Tensor, clamp: bool = True) -> Tensor:
        """Model-space clean sample -> images (B, 3, H, W), differentiable; in [0, 1] when clamped."""
        z = self.backbone.from_model(x0, self.latent_hw())
        images = self.vae.decode(z.to(next(self.vae.parameters()).dtype)).float() / 2 + 0.5
        return images.clamp(0, 1) if clamp else images

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> model-space x0."""
        return self.backbone.to_model(self.vae.encode(images.to(next(self.vae.parameters()).dtype)).float())

    @torch.no_grad()
    def generate(self, prompts: list[str], x_T: Tensor, model: Callable | None = None, negative: str = "",
                 eta: float = 0.0, generator=None, progress: bool = False) -> Tensor:
        """Text to images (B, 3, H, W) in [0, 1] from x_T with `model` (default: the base model)."""
        cond, uncond = self.conds(prompts, negative)
        model = self.backbone if model is None else model
        return self.decode(self.rollout(model, x_T, cond, uncond, eta, generator, trajectory=False,
                                        progress=progress))


# ------------------------------------------------------------------------------------------------------------- load

def detect(path: str) -> str:
    """'sd' or 'flux', from a pipeline folder's model_index.json or a single file's keys."""
    if not os.path.exists(path):
        raise WeightsError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise WeightsError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
        return "flux" if "Flux" in str(weights.read_config(path, "model_index.json").get("_class_name")) else "sd"
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


def default_size(vae: nn.Module, arch: str) -> int:
    """Image size when none is given: the VAE config's `sample_size` (as diffusers reads it: 512 for SD1.5, 1024 for
    FLUX.1, 32 for the toy models), else 512 (SD) or 1024 (FLUX)."""
    size = getattr(vae.config, "sample_size", None)
    return size if isinstance(size, int) and size > 0 else (1024 if arch == "flux" else 512)


def load(path: str, device="cpu", dtype: torch.dtype = torch.float32, height: int | None = None,
         width: int | None = None, steps: int | None = None, guidance: float | None = None,
         tokenizer: str | None = None, components: str | None = None, max_length: int = 512,
         unet_config=None, vae_config=None) -> Pipeline:
    """PATH: a diffusers SD1.x folder (model_index.json) or an SD1.5 single file (with `tokenizer`, a CLIP tokenizer
    folder; `unet_config` / `vae_config` for a file that is not SD1.5-sized); or a diffusers FLUX folder, or a BFL FLUX
    single file (with `components`, a diffusers FLUX folder for the VAE and text encoders). Defaults: SD 50 steps,
    CFG 7.5; FLUX 28 steps, distilled guidance 3.5; the size from the VAE config."""
    arch = detect(path)
    if arch == "flux":
        folder = path if os.path.isdir(path) else components
        if folder is None:
            raise WeightsError(f"{path} holds only the FLUX transformer: pass --components FOLDER, a diffusers FLUX "
                               "folder with vae/, text_encoder(_2)/, tokenizer(_2)/")
        if not os.path.isdir(folder):
            raise WeightsError(f"no such FLUX pipeline folder: {folder}")
        for sub in (("transformer",) if folder == path else ()) + \
                ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if not os.path.isdir(os.path.join(folder, sub)):
                raise WeightsError(f"{folder} is not a diffusers FLUX folder: no {sub}/")
        model = weights_flux.load_flux(os.path.join(path, "transformer") if folder == path else path, dtype, device)
        shift = model.config.guidance_embed
        if os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
            shift = bool(weights.read_config(os.path.join(folder, "scheduler"), "scheduler_config.json")
                         .get("use_dynamic_shifting", shift))
        # NOTE: the toy folders' text_encoder_2 is a CLIP text tower standing in for T5, with a CLIP tokenizer
        t5 = weights.load_text_encoder(os.path.join(folder, "text_encoder_2"), dtype, device)
        text = FluxText(weights.load_text_encoder(os.path.join(folder, "text_encoder"), dtype, device),
                        weights.load_tokenizer(os.path.join(folder, "tokenizer")), t5,
                        weights.load_tokenizer(os.path.join(folder, "tokenizer_2"),
                                               kind="t5" if t5.config.model_type == "t5" else "clip"), max_length)
        vae = weights.load_vae(os.path.join(folder, "vae"), dtype, device)
        backbone = Flow(model)
        steps, guidance = steps or 28, 3.5 if guidance is None else guidance
    else:
        if os.path.isdir(path):
            index = weights.read_config(path, "model_index.json")
            missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(path, s))]
            if missing:
                raise WeightsError(f"{path} is not a diffusers SD folder ({index.get('_class_name')}): no {missing}")
            sched = os.path.join(path, "scheduler")
            scheduler = weights.read_config(sched, "scheduler_config.json") \
                if os.path.isfile(os.path.join(sched, "scheduler_config.json")) else dict(sampler.SD15_SCHEDULER)
            parts = [os.path.join(path, s) for s in ("unet", "vae", "text_encoder", "tokenizer")]
        else:
            if tokenizer is None:
                raise WeightsError(f"{path}: a single-file checkpoint needs a CLIP tokenizer folder (--tokenizer)")
            scheduler, parts = dict(sampler.SD15_SCHEDULER), [path, path, path, tokenizer]
        unet = weights.load_unet(parts[0], dtype, device, unet_config)
        vae = weights.load_vae(parts[1], dtype, device, vae_config)
        text = SDText(weights.load_text_encoder(parts[2], dtype, device), weights.load_tokenizer(parts[3]))
        try:
            schedule = sampler.VPSchedule.from_config(scheduler)
        except (KeyError, TypeError) as e:
            raise WeightsError(f"{path}: unreadable scheduler settings: {e}") from None
        backbone, shift = VP(unet, schedule), True
        steps, guidance = steps or 50, 7.5 if guidance is None else guidance
    size = default_size(vae, arch)
    return Pipeline(backbone, vae, text, height or size, width or height or size, steps, guidance, shift)


