"""The toy world: renderer, splits, tokenizer, judge, shipped models (strict loading, sampling quality), toy rewards."""
import random

import pytest
import torch

import toy

# Judge accuracy floors for a short sampling run of the shipped base models (12 train prompts, 15 steps).
# The build measured (metrics.json) well above these; they catch a broken model, loader or sampler.
SD_FLOOR, FLUX_FLOOR = 0.4, 0.2  # binding accuracy; chance (a random render of another prompt) is ~0.1


def test_render_is_deterministic_and_seeded():
    a, b = toy.render_batch(["a red circle left of a blue square"] * 2, [3, 3]), toy.render_batch(
        ["a red circle left of a blue square"], [3])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[0])
    assert not torch.equal(toy.render_batch(["a red circle"], [0]), toy.render_batch(["a red circle"], [1]))


def test_grammar_and_splits():
    every = toy.prompts("all")
    assert len(every) == 18 + 1080 and all(str(toy.parse(p)) == p for p in every)
    train, held = set(toy.prompts("train")), set(toy.prompts("heldout"))
    assert train.isdisjoint(held) and train | held == set(every)
    # held-out prompts are exactly the relations that use a held-out colour-shape binding; singles are all trained
    for p in held:
        q = toy.parse(p)
        assert q.relation and any((o.colour, o.shape) in toy.HELDOUT_BINDINGS for o in q.objects)
    assert all(p in train for p in every[:18])
    # HyperAlign's division of the train split: disjoint, complete, relations only unseen, fixed sizes
    hyper, unseen = set(toy.prompts("hyper-train")), set(toy.prompts("unseen"))
    assert hyper.isdisjoint(unseen) and hyper | unseen == train and (len(hyper), len(unseen)) == (467, 199)
    assert all(toy.parse(p).relation for p in unseen) and all(p in hyper for p in every[:18])
    with pytest.raises(ValueError, match="split must be"):
        toy.prompts("test")
    with pytest.raises(ValueError, match="toy-world caption"):
        toy.parse("a purple circle")
    with pytest.raises(ValueError):
        toy.parse("a red circle near a blue square")


def test_layout_respects_relation():
    for p in random.Random(0).sample(toy.prompts("all")[18:], 200):
        (_, _, xa, ya), (_, _, xb, yb) = toy.layout(p, 7)
        rel = toy.parse(p).relation
        dx, dy = xb - xa, yb - ya
        assert {"left of": dx > 2 * abs(dy), "right of": -dx > 2 * abs(dy), "above": dy > 2 * abs(dx),
                "below": -dy > 2 * abs(dx)}[rel], p


def test_judge_on_clean_renders_and_noise():
    caps = [random.Random(1).choice(toy.prompts("all")) for _ in range(200)]
    clean = toy.judge(toy.render_batch(caps, 100), caps)
    assert all(v.mean() >= 0.95 for v in clean.values()), toy.summary(clean, caps)
    noise = toy.summary(toy.judge(torch.rand(200, 3, 32, 32), caps), caps)
    assert noise["overall"] <= 0.02 and noise["binding"] <= 0.05, noise
    # renders of other prompts: near chance (a random scene rarely matches a random caption)
    other = [random.Random(2).choice(toy.prompts("all")) for _ in range(200)]
    assert toy.summary(toy.judge(toy.render_batch(other, 5), caps), caps)["overall"] <= 0.05


def test_judge_scores_each_attribute():
    x = toy.render_batch(["a red circle left of a blue square"], [0])
    s = toy.judge(x.repeat(4, 1, 1, 1), ["a red circle left of a blue square", "a red circle right of a blue square",
                                         "a red triangle left of a blue square", "a red circle"])
    assert s["overall"].tolist() == [1, 0, 0, 0]
    assert s["position"].tolist() == [1, 0, 0, 1] and s["binding"].tolist() == [1, 1, 0.5, 1]
    assert s["count"].tolist() == [1, 1, 1, 0] and s["colour"].tolist() == [1, 1, 1, 1]


def test_tokenizer_has_one_token_per_world_word(tmp_path):
    toy.write_tokenizer(str(tmp_path))
    tok = toy.load_tokenizer(str(tmp_path))
    for w in toy.words():
        assert len(tok(w).input_ids) == 3, w  # <|startoftext|> word <|endoftext|>
    ids = tok("a red circle left of a blue square", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 0 and ids[10] == 1 and set(ids[10:]) == {1}
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle left of a blue square"
    shipped = toy.load_tokenizer(toy.CLIP_DIR)
    assert shipped.get_vocab() == tok.get_vocab()


# ---- shipped files

@pytest.fixture(scope="module")
def sd_pipe():
    import weights
    return weights.load_sd(toy.SD_DIR)


@pytest.fixture(scope="module")
def flux_pipe():
    import weights
    return weights.load_flux_pipeline(toy.FLUX_DIR)


def test_shipped_files_load_strictly(sd_pipe, flux_pipe):
    import rewards
    import weights
    assert sd_pipe.unet.config.cross_attention_dim == sd_pipe.text_encoder.config.hidden_size
    assert sd_pipe.scheduler["beta_schedule"] == "scaled_linear" and sd_pipe.scheduler["steps_offset"] == 1
    assert flux_pipe.transformer.config.in_channels == 4 * flux_pipe.vae.config.latent_channels == 16
    assert not flux_pipe.transformer.config.guidance_embed and not flux_pipe.shift
    clip = rewards.load_clip_model(toy.CLIP_DIR)
    assert clip.config.vision_config.image_size == toy.SIZE
    # the text towers saved for SD and FLUX are the CLIP's own
    ids = toy.load_tokenizer(toy.CLIP_DIR)(["a red circle"], padding="max_length", max_length=77,
                                           return_tensors="pt").input_ids
    ref = clip.text_model(input_ids=ids).last_hidden_state
    assert torch.equal(sd_pipe.text_encoder(ids).last_hidden_state, ref)
    assert torch.allclose(flux_pipe.t5(ids[:, :16]).last_hidden_state, ref[:, :16], atol=1e-6)
    # the VAE round-trips a render
    x = toy.render_batch(["a green triangle above a yellow circle"], [0])
    x_rec = (weights.load_vae(toy.SD_DIR).decode(sd_pipe.vae.encode(x * 2 - 1)).clamp(-1, 1) + 1) / 2
    assert (x_rec - x).abs().mean() < 0.05


def test_shipped_flux_folder_is_a_diffusers_folder():
    """The transformer/ folder holds diffusers names; diffusers (the oracle) builds the same model from it."""
    from diffusers import FluxTransformer2DModel

    import weights
    from sampler import image_ids
    ours = weights.load_flux(toy.FLUX_DIR)
    ref = FluxTransformer2DModel.from_pretrained(f"{toy.FLUX_DIR}/transformer").eval()
    x, txt, y, t = torch.randn(2, 16, 16), torch.randn(2, 16, 64), torch.randn(2, 64), torch.rand(2)
    ids = image_ids(2, 8, 8)
    with torch.no_grad():
        a = ours(x, ids, txt, torch.zeros(2, 16, 3), t, y)
        b = ref(hidden_states=x, encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids[0],
                txt_ids=torch.zeros(16, 3)).sample
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_base_models_beat_the_judge_floor(sd_pipe, flux_pipe):
    import toy_eval
    caps = toy.eval_prompts("train", 12)
    sd = toy.summary(toy.judge(toy_eval.sample_sd(sd_pipe, caps, seed=0, steps=15), caps), caps)
    fx = toy.summary(toy.judge(toy_eval.sample_flux(flux_pipe, caps, seed=0, steps=15), caps), caps)
    assert sd["binding"] >= SD_FLOOR and sd["colour"] >= 0.6, sd
    assert fx["binding"] >= FLUX_FLOOR and fx["colour"] >= 0.6, fx


# ---- toy rewards and preference data

def test_toy_rewards_follow_the_contract():
    import rewards
    r = rewards.parse_reward_spec("toy-clip,toy-pref=0.5")
    caps = ["a red circle left of a blue square", "a yellow triangle", "a cyan square below a green circle"]
    x = toy.render_batch(caps, 0).requires_grad_(True)
    score = r(x, caps)
    assert score.shape == (3,) and score.dtype == torch.float32
    score.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())
    clip, pref = toy.toy_clip_score(), toy.toy_preference()
    with torch.no_grad():
        right = clip(x, caps)
        wrong = clip(x, caps[1:] + caps[:1])
        assert (right > wrong).all()
        assert (pref(x, caps) > pref((x + 0.15 * torch.randn_like(x)).clamp(0, 1), caps)).all()


def test_rejected_kinds_fail_the_judge_where_they_should():
    """Each kind of rejected image: the alignment kinds fail the judge, the quality kinds keep the layout."""
    import random
    import toy_eval
    cap = "a red circle left of a blue square"
    clean = toy.render_batch([cap], [4])
    out = {k: toy.to_tensor([toy_eval.degrade(cap, 4, k, random.Random(1))]) for k in toy_eval.DEGRADATIONS}
    judged = {k: toy.judge(x, [cap]) for k, x in out.items()}
    assert judged["missing"]["count"].item() == 0 and len(toy.detect(out["missing"])[0]) == 1
    assert toy.to_tensor([toy_eval.degrade("a red circle", 4, "missing", random.Random(1))]).max() == 0  # empty canvas
    assert judged["wrong"]["overall"].item() == 0
    assert not out["tint"].equal(clean)
    background = clean.amax(1) < 0.2
    assert (out["tint"] - clean).abs().amax(1)[background].max() == 0  # tint touches the objects only
    for k in ("blur", "washed"):
        assert judged[k]["count"].item() == 1, k


def test_toy_preference_prefers_the_clean_render_to_each_kind_of_rejected_one():
    import random
    import toy_eval
    caps = ["a red circle left of a blue square", "a yellow triangle above a cyan circle", "a green square"]
    pref = toy.toy_preference()
    clean = toy.render_batch(caps, [10**7, 10**7 + 1, 10**7 + 2])
    with torch.no_grad():
        r_clean = pref(clean, caps)
        for k in ("blur", "noise", "washed", "cast", "missing", "tint"):
            bad = toy.to_tensor([toy_eval.degrade(c, 10**7 + i, k, random.Random(i)) for i, c in enumerate(caps)])
            assert (r_clean > pref(bad, caps)).all(), k


def test_preference_data_reads_with_the_real_reader():
    import prefs
    reader = prefs.open_prefs(toy.PREFS_PATH)
    pairs = [p for _, p in zip(range(20), reader)]
    assert len(pairs) == 20
    chosen = toy.to_tensor([p.chosen for p in pairs])
    caps = [p.prompt for p in pairs]
    assert toy.judge(chosen, caps)["overall"].mean() == 1.0  # the preferred image is always a clean render
    assert all(p.chosen.size == (toy.SIZE, toy.SIZE) for p in pairs)


def test_toy_preference_in_bf16_is_close_to_fp32():
    """`--reward-dtype bfloat16` on the toy reward: a bf16 head must accept the float32 features."""
    x = toy.render_batch(["a red circle", "a blue square left of a green triangle"], 3)
    caps = ["a red circle", "a blue square left of a green triangle"]
    r32 = toy.toy_preference()(x, caps)
    r16 = toy.toy_preference(dtype=torch.bfloat16)(x, caps)
    assert r16.dtype == torch.float32 and (r16 - r32).abs().max() < 0.05
