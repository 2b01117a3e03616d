"""Can HyperAlign learn a LoRA that depends on the prompt when the reward asks for it? On the shipped toy SD model,
through the reward path, at the training learning rate and budget (150 steps), scored on held-out prompts.

The reward (benchmarks/probe_adaptive.py, "opposite"): s(prompt)·(mean red − mean blue), s = +1 for "left of" and
−1 for "right of" prompts. One LoRA for all prompts gains nothing on average here; a LoRA per relation can gain on
both. Measured (docs/results.md §7): the oracle, one static LoRA per relation picked by reading the prompt, gains on
both relations; HyperAlign-I does not. The oracle's test is the instrument check (this reward, budget and scoring can
show a gain from adapting); HyperAlign's is a strict expected failure, so that a change that makes it pass is
noticed and the documents updated.
"""
import os
import sys
from dataclasses import replace

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import config  # noqa: E402
import methods  # noqa: E402
import probe_adaptive as probe  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 150                                                         # the default training budget (config.RunConfig)


@pytest.fixture(scope="module")
def setup():
    cfg = config.RunConfig(lambda_reg=0.0, steps=STEPS, no_eval=True, threads=1)
    assert cfg.steps == config.RunConfig().steps
    pipe = config.load_pipeline(cfg)
    train = probe.split("hyper-train")
    return cfg, pipe, train, probe.split("val"), probe.colour_reward("opposite")


def held_out_gains(setup, make) -> dict:
    _, pipe, _, val, reward = setup
    torch.manual_seed(0)
    return probe.gains(pipe, make, reward, val, seed=0)


def test_the_oracle_gains_on_both_relations(setup, tmp_path):
    """The instrument check: a static LoRA per relation (half the budget each) raises the held-out reward of both."""
    cfg, pipe, train, _, reward = setup
    loras = {r.strip(): probe.train("static", replace(cfg, lr=3e-4, steps=STEPS // 2),
                                    [q for q in train if r in q], pipe, reward, str(tmp_path))
             for r in probe.RELATIONS}
    oracle = methods.Oracle(loras, probe.relation, pipe.backbone)
    gain = held_out_gains(setup, lambda cond, prompts: oracle.sampler_model(cond, pipe.steps, prompts))
    assert min(gain.values()) > 0.03, gain


@pytest.mark.xfail(strict=True, reason="HyperAlign-I collects none of the headroom at this budget (docs/results.md "
                                       "§7: about 0 on both relations over 3 seeds)")
def test_hyperalign_gains_on_both_relations(setup, tmp_path):
    cfg, pipe, train, _, reward = setup
    method = probe.train("hyperalign", replace(cfg, lr=1e-4, variant="I"), train, pipe, reward, str(tmp_path))
    gain = held_out_gains(setup, lambda cond, prompts: method.sampler_model(cond, pipe.steps))
    assert min(gain.values()) > 0.03, gain
