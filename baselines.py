"""Train the static-LoRA baseline with exactly train.py's settings, data and loss: `python baselines.py`.

One set of LoRA factors for every input (methods.StaticLoRA), trained by losses.training_step as HyperAlign's
hypernetwork is, on the same targets, rank, prompts, step seeds, L_R + λ L_G and evaluation: the two differ only in
where Δθ comes from. It is the paper's "fine-tuning" contrast, DRaFT-1-like (the reward gradient through the last
model call only).

The same LoRA trained with the paper's other fine-tuning baselines' own losses (finetune.py; the authors' defaults):
    python baselines.py --reward-mode direct-align --reward rel-toy-comp --reward-from 0 --lambda-reg 0 --out DIR
                                                            # Direct-Align + SRPO's relative reward (seed 002)
    python baselines.py --objective dpo --lambda-reg 0 --out DIR     # Diffusion-DPO on --prefs' pairs (β 5000)
    python baselines.py --objective kto --lambda-reg 0 --out DIR     # Diffusion-KTO, chosen / rejected images (β 1000)
    python baselines.py --objective grpo --lambda-reg 0 --out DIR    # GRPO: DDPO (VP) / Flow-GRPO (flow) on --reward

Writes DIR (--out) as train.py does: config.json, checkpoints, metrics.jsonl, metrics.json, samples.png; sample.py
--hyper DIR and evaluate.py read it like a HyperAlign run.
"""
from __future__ import annotations

import sys

import config
import methods
import runs


def main(argv=None) -> None:
    # the static LoRA has no variant and no key steps: those flags are not offered
    cfg, resume, overwrite = config.parse(argv, __doc__.split("\n")[0], exclude=("variant", "key_steps"),
                                          per_preset=config.static, out="runs/static-lora")

    def build(backbone) -> methods.StaticLoRA:        # one LoRA of --hyper's targets and --rank on the frozen model
        return methods.StaticLoRA(config.hyper_config(cfg), backbone)

    code = config.cli(lambda: runs.train(build, cfg, resume, overwrite))
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
