"""What the hypernetwork generates, measured: does Δθ depend on the prompt and the state, or is it one static LoRA?

    delta_theta(method, x_t, t, cond)   Δθ = s·B·A of every target, flattened: (B, P)
    adaptivity(d)                       the share of E||Δθ||² that lies between inputs (0: one static LoRA for all)
    at_x_T(method, pipe, prompts, seeds)    Δθ(x_T, T, c) over prompts x seeds, and its adaptivity   (paper Fig. 9)
    along_trajectory(method, pipe, prompts) Δθ_t at every step of S trajectories                     (paper Fig. 8)
    Averaged(method, pipe, prompts, seeds)  HyperAlign with its LoRAs replaced by their mean (the adaptive part removed)
    decoder_report(ha, pipe, prompts, flipped)  where the decoder looks, and how far a prompt edit moves what it makes

train.py reports `adaptivity` in metrics.json; analysis.py draws Fig. 8 / 9 from the same functions.
Shape alphabet: N sampling steps, B inputs, P flattened LoRA parameters, S seeds.
"""
from __future__ import annotations

import torch
from torch import Tensor


def delta_theta(method, x_t: Tensor, t: Tensor, cond) -> Tensor:
    """Δθ of every LoRA target for each input, flattened and concatenated: (B, P). Per sample: s·B_b·A_b."""
    factors = method.factors(x_t, t, cond)
    return torch.cat([(method.cfg.scale * (B if B.dim() == 3 else B[None]) @ (A if A.dim() == 3 else A[None]))
                      .flatten(1).expand(x_t.shape[0], -1) for A, B in factors.values()], dim=1)


def adaptivity(d: Tensor) -> float:
    """Share of the second moment of Δθ that lies between inputs: E||Δθ_i − mean Δθ||² / E||Δθ_i||², for d (B, P).

    Δθ = 0 is the base model, so the second moment is taken about zero: 0 means every input gets the same LoRA (a
    static LoRA), 1 means the LoRAs average out to nothing (pure adaptation); a LoRA that is half shared and half
    input-specific scores about 0.5."""
    d = d.double()
    total = d.square().sum(-1).mean()
    if total == 0:
        return 0.0
    return ((d - d.mean(0)).square().sum(-1).mean() / total).item()


def pca(d: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
    """Projection of the centred rows of d (B, P) on their first k principal components, (B, k), and the fraction of
    the centred variance each explains, (k,). The sign of each component is fixed (first row >= 0): deterministic."""
    d = d.double() - d.double().mean(0)
    U, S, _ = torch.linalg.svd(d, full_matrices=False)
    U = U * torch.sign(U[0:1]).where(U[0:1] != 0, torch.ones_like(U[0:1]))
    var = S ** 2
    return (U[:, :k] * S[:k]).float(), (var[:k] / var.sum().clamp_min(1e-30)).float()


@torch.no_grad()
def at_x_T(method, pipe, prompts: list[str], seeds: list[int]) -> dict:
    """Δθ(x_T, T, c) for every (seed, prompt): {"delta": (S·B, P), "labels": (S·B,) prompt index, "adaptivity",
    "adaptivity_prompts" (between prompts, of the mean over seeds), "xy" (S·B, 2) and "explained" (2,) of the PCA}."""
    cond, _ = pipe.conds(prompts)
    t0 = pipe.t_batch(pipe.timesteps()[0], len(prompts))
    d = torch.cat([delta_theta(method, pipe.noise(len(prompts), torch.Generator().manual_seed(s)), t0, cond)
                   for s in seeds]).double()                                        # (S·B, P)
    xy, explained = pca(d)
    per_prompt = d.view(len(seeds), len(prompts), -1).mean(0)                        # (B, P)
    return {"delta": d, "labels": torch.arange(len(prompts)).repeat(len(seeds)), "xy": xy, "explained": explained,
            "adaptivity": adaptivity(d), "adaptivity_prompts": adaptivity(per_prompt)}


@torch.no_grad()
def along_trajectory(method, pipe, prompts: list[str], seed: int = 0) -> dict:
    """Δθ_t at every step of HyperAlign-S trajectories from the states the sampler visits: {"t": [N],
    "cos_first" (N, B) = cos(Δθ_t, Δθ_first), "change" (N−1, B) = |Δθ_t − Δθ_{t−1}| / |Δθ_{t−1}|, "adaptivity" over
    all steps and prompts}."""
    cond, uncond = pipe.conds(prompts)
    x_T = pipe.noise(len(prompts), torch.Generator().manual_seed(seed))
    traj = pipe.rollout(method.sampler_model(cond, pipe.steps, "S"), x_T, cond, uncond)
    d = torch.stack([delta_theta(method, traj["x_t"][i], pipe.t_batch(t, len(prompts)), cond)
                     for i, t in enumerate(traj["t"])]).double()                    # (N, B, P)
    cos = torch.nn.functional.cosine_similarity(d, d[:1].expand_as(d), dim=-1)
    change = (d[1:] - d[:-1]).norm(dim=-1) / d[:-1].norm(dim=-1).clamp_min(1e-30)
    return {"t": traj["t"], "cos_first": cos, "change": change, "adaptivity": adaptivity(d.flatten(0, 1))}


class Averaged:
    """HyperAlign with every generated LoRA replaced by their mean: Δθ̄ = E_inputs Σ_k w_k Δθ_k, the LoRAs made while
    sampling `prompts` x `seeds`, each weighted by the share w_k of the trajectory it serves (S: 1/N per step; P: its
    segment; I: the whole). Δθ̄ is the one static LoRA closest in least squares to what the hypernetwork applies;
    sampling with it and with HyperAlign from the same x_T measures how much of HyperAlign's effect the adaptive part
    carries (equal rewards: the input-dependence does nothing). Offers `sampler_model` like the methods."""

    @torch.no_grad()
    def __init__(self, method, pipe, prompts: list[str], seeds: list[int]):
        self.backbone, sums, n = method.backbone, {}, 0
        cond, uncond = pipe.conds(prompts)
        for s in seeds:
            model = method.sampler_model(cond, pipe.steps)
            model.keep = True
            pipe.rollout(model, pipe.noise(len(prompts), torch.Generator().manual_seed(s)), cond, uncond,
                         trajectory=False)
            starts = [k for k, _ in model.made] + [pipe.steps]
            for (k, factors), end in zip(model.made, starts[1:]):
                w = (end - k) / pipe.steps
                for name, (A, B) in factors.items():                 # A (B, 2R, I), B (B, O, 2R)
                    d = w * method.cfg.scale * (B @ A).sum(0)
                    sums[name] = sums[name] + d if name in sums else d
            n += len(prompts)
        model = self.backbone.model
        self.params = {f"{k}.weight": model.get_submodule(k).weight + v / n for k, v in sums.items()}

    def sampler_model(self, cond=None, steps: int | None = None):
        return lambda x_t, t, c: self.backbone.forward(self.params, x_t, t, c)


@torch.no_grad()
def decoder_report(ha, pipe, prompts: list[str], flipped: list[str], seed: int = 0) -> dict:
    """What the hypernetwork's decoder does with its inputs at x_T, trained and at initialisation (its frozen ⁰ copy).

    prompts / flipped: pairs that differ by one edit (e.g. "left of" -> "right of"). For the decoder and for decoder⁰:
      attention   per cross-attention layer: the normalised entropy of the weights (1: uniform over the memory) and
                  the weight mass on each memory source beside its share of the tokens (uniform attention: equal)
      norm, edit / prompts / seed   mean ||M||; ||M(flipped) − M||, the spread between prompts (mean ||M − mean M||) and
                  ||M(other x_T) − M||, each over the mean ||M||, for the generated cores M, and for the head's
                  input h (the decoder's last tokens): how much the edit moves each beside other changes of input
    plus, for the trained decoder, how far its parameters moved: ||W − W⁰|| / ||W⁰|| for the head and the median
    over the other weight matrices.
    """
    net = ha.hypernet
    cond, _ = pipe.conds(prompts)
    cond_f, _ = pipe.conds(flipped)
    t = pipe.t_batch(pipe.timesteps()[0], len(prompts))
    x, x2 = (pipe.noise(len(prompts), torch.Generator().manual_seed(s)) for s in (seed, seed + 1))
    feats = {"": ha.backbone.features(x, t, cond), "edit": ha.backbone.features(x, t, cond_f),
             "seed": ha.backbone.features(x2, t, cond)}
    sizes = [f.shape[1] for f in feats[""][0]] + [feats[""][1].shape[1], 1]
    names = [f"level {i}" for i in range(len(feats[""][0]))] + ["text", "time"]

    def run(decoder):
        seen, heads, M = [], [], {}
        looks = [layer.cross_attn.register_forward_hook(lambda m, a, o: seen.append(m.weights(*a)))
                 for layer in decoder.layers]
        head = decoder.head.register_forward_hook(lambda m, a, o: heads.append(a[0]))
        try:
            for k, f in feats.items():
                M[k] = decoder(*f).flatten(1).double()
                for look in looks:                            # attention weights of the unedited input only
                    look.remove()
        finally:
            for hook in (*looks, head):
                hook.remove()
        h = {k: v.flatten(1).double() for k, v in zip(feats, heads)}
        attention = []
        for w in seen:
            entropy = -(w * w.clamp_min(1e-30).log()).sum(-1) / torch.log(torch.tensor(float(w.shape[-1])))
            mass = [c.sum(-1).mean().item() for c in w.split(sizes, dim=-1)]
            attention.append({"entropy": entropy.mean().item(),
                              "mass": dict(zip(names, mass)),
                              "uniform": {n: s / sum(sizes) for n, s in zip(names, sizes)}})
        return {"attention": attention, "M": _moves(M), "h": _moves(h)}

    out = {"trained": run(net.decoder), "init": run(net.decoder0)}
    before = dict(net.decoder0.named_parameters())
    moved = {n: ((p - before[n]).norm() / before[n].norm()).item() for n, p in net.decoder.named_parameters()
             if p.dim() == 2 and n != "head.weight"}
    out["moved"] = {"head": ((net.decoder.head.weight - before["head.weight"]).norm()
                             / before["head.weight"].norm()).item(),
                    "other_median": sorted(moved.values())[len(moved) // 2]}
    return out


def _moves(v: dict) -> dict:
    """{"norm": mean ||v[""]||, "edit", "prompts", "seed"}: how far the edited prompt, the other prompts and another
    x_T move v[""], over its norm."""
    base, scale = v[""], v[""].norm(dim=1).mean()
    return {"norm": scale.item(), "edit": ((v["edit"] - base).norm(dim=1).mean() / scale).item(),
            "prompts": ((base - base.mean(0)).norm(dim=1).mean() / scale).item(),
            "seed": ((v["seed"] - base).norm(dim=1).mean() / scale).item()}
