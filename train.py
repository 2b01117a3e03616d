"""Train a HyperAlign hypernetwork: `python train.py --variant I` (or S, P) runs on the toy SD model out of the box.

Each step, for a batch of prompts (paper sec. 4.3, L = L_R + λ L_G; losses.training_step):
  1. roll out trajectories without gradient with the *current* hypernetwork (variant S / I / P);
  2. per sample, pick a step k of its trajectory; the hypernetwork makes Δθ from the state its variant would use
     (S: x_k; I: x_T; P: the state at the start of k's segment, P's key steps calibrated first: hyperalign.calibrate);
     one modulated model step at x_k gives x0_hat, which is decoded and scored: L_R = -r(D(x0_hat));
  3. L_G: a preferred image from the preference data, noised to a random t, denoised by the modulated model;
  4. AdamW on the hypernetwork only (runs.fit). The frozen generator, VAE, text encoder and reward get no gradients.
Then the hypernetwork is scored against the base model on every held-out prompt set (same x_T for both).

Settings: config.py (--preset toy-sd | toy-flux | sd15 | flux-dev, and one flag per setting; --help lists them).
Multi-GPU: `torchrun --nproc_per_node N train.py ...` (distributed.py): DDP over the hypernetwork only, each rank its
rows of every global batch (N x --batch-size), rank 0 writes the files.

Writes DIR (--out; runs.py): config.json, checkpoint.json + ckpt-*/ (continue with --resume), metrics.jsonl during
training, and at the end metrics.json (reward and toy judge, base vs aligned, per held-out set) and samples.png
(base vs aligned on held-out prompts, labelled). A DIR that already holds a run is refused unless --resume or
--overwrite (which replaces only a folder holding nothing but a run). A folder is locked while a process writes it.
Bad input: one line `error: ...`, exit status 2; Ctrl-C: one line saying which checkpoint is kept, exit status 130.
"""
from __future__ import annotations

import sys

import config
import hyperalign
import runs


def main(argv=None) -> None:
    cfg, resume, overwrite = config.parse(argv, __doc__.split("\n")[0], exclude=config.BASELINE_FLAGS)

    def build(backbone) -> hyperalign.HyperAlign:    # the hypernetwork of --hyper, --variant, --rank
        return hyperalign.HyperAlign(config.hyper_config(cfg), backbone)

    code = config.cli(lambda: runs.train(build, cfg, resume, overwrite))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
