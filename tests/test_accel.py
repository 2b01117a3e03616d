"""accel.py, the fast sampling path: with its static weight buffers and no capture ("eager", the path that runs on the
CPU) it samples exactly what the default functional path samples, for the base model, HyperAlign S / I / P and the
static LoRA; it restores the base weights; graph / compile need CUDA and say so."""
import pytest
import torch
from tiny import make_ha, tiny_pipe

import accel
import hyperalign as H
import methods


def sample(pipe, make_model, seed=0):
    """One sample from `make_model(cond)`'s model callable."""
    cond, uncond = pipe.conds(["a red square"])
    x_T = pipe.noise(1, torch.Generator().manual_seed(seed))
    return pipe.rollout(make_model(cond), x_T, cond, uncond, trajectory=False)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_eager_fast_path_equals_the_default_path(kind):
    pipe = tiny_pipe(kind, steps=5)
    torch.manual_seed(1)
    for variant in H.VARIANTS:
        ha = make_ha(pipe, variant, key_steps=(0, 2), key_of=5)
        with torch.no_grad():
            for p in ha.hypernet.decoder.parameters():
                p.add_(0.2 * torch.randn_like(p))
        fast = accel.Fast(pipe.backbone, accel.fast_targets(ha), "eager")
        ref = sample(pipe, lambda c: ha.sampler_model(c, pipe.steps))
        ours = sample(pipe, lambda c: ha.sampler_model(c, pipe.steps, fast=fast))
        assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6), (variant, (ours - ref).abs().max())
        fast.weights.reset()
        assert torch.equal(sample(pipe, lambda c: fast.base_model()), sample(pipe, lambda c: pipe.backbone))
    sl = methods.StaticLoRA(ha.cfg, pipe.backbone)
    with torch.no_grad():
        for b in sl.B:
            b.normal_(0, 0.1)
    fast = accel.Fast(pipe.backbone, accel.fast_targets(sl), "eager")
    ours = sample(pipe, lambda c: sl.sampler_model(c, fast=fast))
    fast.weights.reset()                                   # the model holds the LoRA until then
    assert torch.allclose(ours, sample(pipe, lambda c: sl.sampler_model(c)), rtol=1e-5, atol=1e-6)


def test_graph_and_compile_need_cuda_and_one_sample_at_a_time():
    pipe = tiny_pipe("vp")
    ha = make_ha(pipe, "I")
    if not torch.cuda.is_available():
        for mode in ("graph", "compile"):
            with pytest.raises(ValueError, match="needs a CUDA device"):
                accel.Fast(pipe.backbone, accel.fast_targets(ha), mode)
    fast = accel.Fast(pipe.backbone, accel.fast_targets(ha), "eager")
    with pytest.raises(ValueError, match="one image at a time"):
        ha.sampler_model(pipe.conds(["a", "b"])[0], pipe.steps, fast=fast)
    with pytest.raises(ValueError, match="fast mode"):
        accel.Fast(pipe.backbone, [], "turbo")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_path_equals_eager_on_a_gpu():
    pipe = tiny_pipe("vp", steps=5)
    pipe.backbone.model.cuda(), pipe.vae.cuda()
    text = pipe.text
    pipe.text = lambda p: text(p).cuda()
    torch.manual_seed(1)
    for variant in H.VARIANTS:
        ha = make_ha(pipe, variant, key_steps=(0, 2), key_of=5).cuda()
        with torch.no_grad():
            for p in ha.hypernet.decoder.parameters():
                p.add_(0.2 * torch.randn_like(p))
        fast = accel.Fast(pipe.backbone, accel.fast_targets(ha), "graph")
        ours = sample(pipe, lambda c: ha.sampler_model(c, pipe.steps, fast=fast))
        fast.weights.reset()
        ref = sample(pipe, lambda c: ha.sampler_model(c, pipe.steps))
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), (variant, (ours - ref).abs().max())


def test_the_prepared_gpu_benchmark_runs(tmp_path):
    """benchmarks/bench_gpu.py (what benchmarks/gpu.sh runs on a lent GPU) on toy sizes on the CPU: every key of its
    JSON is written, so a device run is not spent on a broken script. A smoke test, not a measurement."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--runs", "1", "--steps", "2",
                        "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert {"base_s", "diffusers_s", "I_x", "P_x", "S_x", "batch4", "per_call", "flux_slice"} <= set(res)
