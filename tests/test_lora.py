"""lora.py (tiny inline model with diffusers attention names, and the tiny FLUX): B = 0 is the base model; functional
equals explicitly merged; unmerged per-sample LoRAs equal merged weights sample by sample (a loop), with gradients;
gradients reach only the LoRA factors; the checkpoint-safe substitution gives the same gradients."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora
from conftest import rel_err


class Attn(nn.Module):
    def __init__(self, c: int, ctx: int):
        super().__init__()
        self.to_q = nn.Linear(c, c, bias=False)
        self.to_k = nn.Linear(ctx, c, bias=False)
        self.to_v = nn.Linear(ctx, c, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def forward(self, x, ctx):
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.to_out[0](o)


class Block(nn.Module):
    """A U-Net-like block: conv, group norm, time embedding, self- and cross-attention with diffusers names."""
    def __init__(self, c: int = 8, ctx: int = 6):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.GroupNorm(2, c)
        self.emb = nn.Linear(1, c)
        self.attn1, self.attn2 = Attn(c, c), Attn(c, ctx)

    def forward(self, x, t, ctx):
        h = self.conv(F.silu(self.norm(x))) + self.emb(t.view(-1, 1).to(x.dtype))[:, :, None, None]
        B, C, H, W = h.shape
        tok = h.flatten(2).transpose(1, 2)
        tok = tok + self.attn1(tok, tok)
        tok = tok + self.attn2(tok, ctx)
        return x + tok.transpose(1, 2).reshape(B, C, H, W)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.gradient_checkpointing = False

    def forward(self, x, t, ctx):
        for b in self.blocks:
            x = checkpoint(b, x, t, ctx, use_reentrant=False) if self.gradient_checkpointing else b(x, t, ctx)
        return x


def make(batch=None, rank=2, zero_b=False, seed=1):
    torch.manual_seed(seed)
    model = Tiny().eval().requires_grad_(False)
    targets = lora.find_targets(model, lora.UNET_TARGETS)
    lead = () if batch is None else (batch,)
    factors = {t.name: (torch.randn(*lead, rank, t.in_features),
                        torch.zeros(*lead, t.out_features, rank) if zero_b else torch.randn(*lead, t.out_features, rank))
               for t in targets}
    return model, targets, factors


def inputs(n=4):
    return torch.randn(n, 8, 3, 3), torch.randint(0, 1000, (n,)), torch.randn(n, 5, 6)


def test_find_targets_names_and_errors():
    model, targets, _ = make()
    assert len(targets) == 16
    assert targets[0].name == "blocks.0.attn1.to_q" and targets[3].name == "blocks.0.attn1.to_out.0"
    with pytest.raises(ValueError, match="match no nn.Linear"):
        lora.find_targets(model, [r"nope$"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        lora.find_targets(model, [r"blocks\.0\.conv$"])


def one(factors, i):
    """Sample i's factors of batched ones."""
    return {n: (A[i], B[i]) for n, (A, B) in factors.items()}


def loop(model, factors, scale, *args):
    """The per-sample reference: sample b's rows (its K copies, adjacent: b K ... b K + K - 1) run with its own merged
    weights."""
    b = next(iter(factors.values()))[0].shape[0]
    k = args[0].shape[0] // b
    return torch.cat([lora.run(model, lora.merged_params(model, one(factors, i), scale),
                               *[a[i * k:(i + 1) * k] for a in args]) for i in range(b)])


def test_zero_b_is_the_base_model():
    model, _, factors = make(zero_b=True)
    x, t, c = inputs()
    assert torch.equal(lora.run(model, lora.prepare(model, factors, 0.5), x, t, c), model(x, t, c))
    _, _, fb = make(batch=4, zero_b=True)
    # per sample: the linears become batched matmuls, equal to the base up to float rounding
    assert rel_err(lora.run(model, lora.prepare(model, fb, 0.5), x, t, c), model(x, t, c)) < 1e-6


def test_functional_equals_explicitly_merged_and_leaves_model_untouched():
    model, targets, factors = make()
    before = copy.deepcopy(model.state_dict())
    x, t, c = inputs()
    ours = lora.run(model, lora.prepare(model, factors, 0.5), x, t, c)
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for tg in targets:
            A, B = factors[tg.name]
            merged.get_submodule(tg.name).weight += 0.5 * B @ A
    assert rel_err(ours, merged(x, t, c)) < 1e-6
    assert rel_err(ours, model(x, t, c)) > 1e-3                    # the LoRA does something
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("chunk", [1, 2 ** 27])                    # 1: every target its own chunk
def test_grouped_merge_equals_one_product_per_layer(chunk, monkeypatch):
    model, targets, factors = make()
    monkeypatch.setattr(lora, "MERGE_CHUNK", chunk)
    params = lora.merged_params(model, factors, 0.5)
    assert list(params) == [f"{t.name}.weight" for t in targets]   # every target, in module order
    for t in targets:
        A, B = factors[t.name]
        ref = model.get_submodule(t.name).weight + 0.5 * (B @ A)
        assert params[f"{t.name}.weight"].shape == ref.shape and rel_err(params[f"{t.name}.weight"], ref) < 1e-6


def test_prepare_merges_one_lora_and_runs_several_per_sample(monkeypatch):
    model, _, factors = make(batch=3)
    assert isinstance(lora.prepare(model, factors, 0.5), lora.PerSample) and lora.prepare(model, factors, 0.5).merged
    monkeypatch.setattr(lora, "PER_SAMPLE_MERGE", 0)
    assert not lora.prepare(model, factors, 0.5).merged                           # large weights: unmerged
    assert isinstance(lora.prepare(model, {n: (A[:1], B[:1]) for n, (A, B) in factors.items()}, 0.5), dict)
    assert isinstance(lora.prepare(model, one(factors, 0), 0.5), dict)


def flux_case(batch: int):
    from flux import Flux, FluxConfig
    torch.manual_seed(2)
    model = Flux(FluxConfig.preset("flux-tiny")).eval().requires_grad_(False)
    targets = lora.find_targets(model, lora.FLUX_TARGETS)
    factors = {t.name: (torch.randn(batch, 3, t.in_features), torch.randn(batch, t.out_features, 3))
               for t in targets}
    return model, factors


@pytest.mark.parametrize("kind", ["sd", "flux"])
@pytest.mark.parametrize("k", [1, 2])                              # k = 2: CFG copies share their sample's LoRA
@pytest.mark.parametrize("budget", [0, 2 ** 23])                   # 0: unmerged; else merged per sample
def test_per_sample_equals_a_loop_over_samples_with_gradients(kind, k, budget, monkeypatch):
    """Both per-sample paths (unmerged, and merged per sample) = each sample with its own merged weights (a loop),
    outputs and the gradients of every factor, on the inline U-Net-like model (SD targets) and the tiny FLUX (its
    double-block targets).
    NOTE: in float64: with random factors the attention is nearly saturated, and the gradients of q / k through a
    saturated softmax are dominated by float32 rounding (measured 6e-3 apart in fp32, both paths; outputs 1e-7)."""
    monkeypatch.setattr(lora, "PER_SAMPLE_MERGE", budget)
    torch.set_default_dtype(torch.float64)
    try:
        if kind == "sd":
            model, _, factors = make(batch=3)
            args = inputs(3 * k)
        else:
            from sampler import image_ids
            model, factors = flux_case(3)
            n, cfg = 3 * k, model.config
            args = (torch.randn(n, 16, cfg.in_channels), image_ids(n, 8, 8), torch.randn(n, 5, cfg.context_in_dim),
                    torch.zeros(n, 5, 3), torch.rand(n), torch.randn(n, cfg.vec_in_dim), torch.full((n,), 3.5))
        grads, outs = [], []
        for fn in (lambda f, *a: lora.run(model, lora.prepare(model, f, 0.5), *a),
                   lambda f, *a: loop(model, f, 0.5, *a)):
            f = {n: (A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for n, (A, B) in factors.items()}
            y = fn(f, *args)
            y.square().mean().backward()
            outs.append(y.detach())
            grads.append(torch.cat([g.grad.flatten() for ab in f.values() for g in ab]))
        assert rel_err(outs[0], outs[1]) < 1e-10 and rel_err(outs[0], model(*args)) > 1e-3
        assert grads[0].abs().sum() > 0 and rel_err(grads[0], grads[1]) < 1e-10
        assert all("forward" not in vars(m) for m in model.modules())      # each target's own forward is back
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("budget", [0, 2 ** 23])
def test_per_sample_equals_a_loop_in_float32(budget, monkeypatch):
    """The same as sampling runs it, in float32 and without autograd, outputs only: to fp32 rounding (measured
    1.5e-6; the loop of the per-sample vmap path it replaces was held to the same 1e-5)."""
    monkeypatch.setattr(lora, "PER_SAMPLE_MERGE", budget)
    model, _, factors = make(batch=3)
    assert error_to_loop(model, factors, *inputs(6)) < 1e-5


def test_merged_per_sample_weights_follow_changes_to_the_base_weights():
    """prepare keeps each target's Wᵀ between LoRAs (lora.transposed); a weight changed in place, or replaced, is seen
    by the next LoRA."""
    model, targets, factors = make(batch=3)
    args = inputs(3)
    assert error_to_loop(model, factors, *args) < 1e-5
    with torch.no_grad():
        model.get_submodule(targets[0].name).weight.mul_(2)                            # in place
    assert error_to_loop(model, factors, *args) < 1e-5
    module = model.get_submodule(targets[1].name)
    module.weight = nn.Parameter(torch.randn_like(module.weight), requires_grad=False)   # replaced
    assert error_to_loop(model, factors, *args) < 1e-5


def error_to_loop(model, factors, *args) -> float:
    """Relative error of the per-sample LoRAs (prepare, run) against the loop over samples, without autograd."""
    with torch.no_grad():
        return rel_err(lora.run(model, lora.prepare(model, factors, 0.5), *args), loop(model, factors, 0.5, *args))


def test_gradients_reach_only_lora_factors_and_survive_checkpointing():
    model, _, factors = make()
    for A, B in factors.values():
        A.requires_grad_(True), B.requires_grad_(True)
    x, t, c = inputs()
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        with lora.substituted(model, lora.merged_params(model, factors, 0.5)):
            model(x, t, c).square().mean().backward()
        grads.append(torch.cat([g.grad.flatten() for ab in factors.values() for g in ab]))
        for A, B in factors.values():
            A.grad, B.grad = None, None
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert grads[0].abs().sum() > 0 and rel_err(grads[1], grads[0]) < 1e-6
    assert isinstance(model.blocks[0].attn1.to_q.weight, nn.Parameter)  # restored after the block
