"""analysis.py on tiny random models: the curvature numbers match hyperalign.key_steps' rule and are deterministic;
LoRA dynamics and PCA have the right shapes, are deterministic, and the figures are written as PNG files."""
import torch

import analysis as A
import hyperalign as H
from test_hyperalign import make_ha, tiny_pipe

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


def trained_like(pipe, variant="S"):
    """A hypernetwork with Δθ != 0: B_aux and the head randomised, as training would move them."""
    ha = make_ha(pipe, variant)
    torch.manual_seed(0)
    with torch.no_grad():
        for b in ha.hypernet.b_aux:
            b.normal_(0, 0.05)
        ha.hypernet.head.weight.normal_(0, 0.5)
    return ha


def test_curvature_numbers_follow_the_key_step_rule_and_are_deterministic():
    x0 = torch.randn(6, 2, 4, 3, 3)
    delta, kappa = A.one_step_curvature(x0)
    assert delta.shape == (5, 2) and kappa.shape == (4, 2)
    manual = (x0[3, 1] - x0[2, 1]).norm() / x0[2, 1].norm()
    assert torch.allclose(delta[2, 1], manual.double())
    top = int(kappa.mean(1).argmax()) + 1
    assert top in H.key_steps(x0, 1)                            # the largest mean curvature is a key step
    pipe = tiny_pipe("vp", steps=5)
    c1, c2 = A.curvature_data(pipe, PROMPTS, k=2), A.curvature_data(pipe, PROMPTS, k=2)
    assert torch.equal(c1["delta"], c2["delta"]) and c1["key_steps"] == c2["key_steps"]
    assert c1["delta"].shape == (4, 3) and c1["key_steps"][0] == 0 and len(c1["key_steps"]) <= 3


def test_lora_dynamics_and_pca_shapes_determinism_and_pngs(tmp_path):
    pipe = tiny_pipe("vp", steps=4)
    ha = trained_like(pipe)
    d1, d2 = A.lora_dynamics(ha, pipe, PROMPTS), A.lora_dynamics(ha, pipe, PROMPTS)
    assert d1["cos_first"].shape == (4, 3) and d1["change"].shape == (3, 3)
    assert torch.equal(d1["cos_first"], d2["cos_first"])
    assert torch.allclose(d1["cos_first"][0], torch.ones(3, dtype=torch.float64))   # Δθ_first vs itself
    assert (d1["change"] > 0).all()                                                 # S makes new weights each step
    p1, p2 = A.lora_pca(ha, pipe, PROMPTS, [0, 1]), A.lora_pca(ha, pipe, PROMPTS, [0, 1])
    assert p1["xy"].shape == (6, 2) and p1["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(p1["xy"], p2["xy"]) and 0 < p1["explained"].sum() <= 1 + 1e-6
    A.plot_curvature(A.curvature_data(pipe, PROMPTS), str(tmp_path / "c.png"))
    A.plot_dynamics(d1, str(tmp_path / "d.png"))
    A.plot_pca(p1, PROMPTS, str(tmp_path / "p.png"))
    for f in ("c.png", "d.png", "p.png"):
        assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
