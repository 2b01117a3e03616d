"""Samplers: plain functions over a model callable `model(x_t, t, cond) -> prediction`.

A hypernetwork wraps the model callable (see hyperalign.py); the samplers know nothing about LoRA.

Sections:
  # ---- VP diffusion (SD1.5)   noise schedule, DDIM with eta, classifier-free guidance, eps/v prediction, x0_hat
  # ---- rectified flow (FLUX)  shifted schedule, Euler, guidance-distilled sampling, 2x2 packing, image ids, x0_hat
"""
from __future__ import annotations

import torch


# ------------------------------------------------------------------------------------------------- VP diffusion (SD1.5)


# --------------------------------------------------------------------------------------------- rectified flow (FLUX)
