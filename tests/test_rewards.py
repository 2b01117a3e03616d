"""Rewards: HPS key rules against an independent open_clip-layout forward; PickScore / CLIP score / aesthetic against
transformers' own get_image_features / get_text_features; gradients reach the images; SRPO's formula; spec parsing.

open_clip itself cannot be imported here (it needs torchvision, whose PyPI wheel fails to import beside this torch
build), so `openclip_reference` below re-implements open_clip's ViT + text transformer forward from scratch on the
open_clip state dict (packed in_proj attention via torch's own multi_head_attention_forward, class token, ln_pre /
ln_post, causal mask, EOT pooling by argmax of the token ids, `x @ proj`).
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from conftest import rel_err
import rewards
from rewards import (REWARDS, AestheticMLP, CLIPReward, RelativeReward, WeightedSum, clip_preprocess, load_aesthetic,
                     load_clip_score, load_hps, load_pickscore, parse_reward_spec)
import weights
from weights import WeightsError

D, HEADS, LAYERS, PATCH, IMG, CTX, EMBED = 32, 2, 2, 8, 32, 12, 16
PROMPTS = ["a red cat", "two dogs on a sofa"]


def bytes_to_unicode() -> list[str]:  # GPT-2 / CLIP byte alphabet
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: str) -> int:
    """A real CLIPTokenizer with a byte-level vocab (no merges); EOT is the largest id, as in CLIP. -> vocab size."""
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return len(vocab)


def random_openclip_state_dict(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    r = lambda *s, std=0.2: torch.randn(*s, generator=g) * std  # noqa: E731
    sd = {"visual.conv1.weight": r(D, 3, PATCH, PATCH), "visual.class_embedding": r(D),
          "visual.positional_embedding": r((IMG // PATCH) ** 2 + 1, D), "visual.proj": r(D, EMBED),
          "token_embedding.weight": r(vocab, D), "positional_embedding": r(CTX, D), "text_projection": r(D, EMBED),
          "logit_scale": torch.tensor(4.6)}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(D), r(D)
    for tower in ("visual.transformer", "transformer"):
        for i in range(LAYERS):
            p = f"{tower}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(D), r(D)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * D, D), r(3 * D)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(D, D), r(D)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(4 * D, D), r(4 * D)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(D, 4 * D), r(D)
    return sd


def openclip_reference(sd, pixels, ids):
    """open_clip's forward, written from scratch on the open_clip state dict -> unit-norm (f_img, f_txt)."""
    ln = lambda x, p: F.layer_norm(x, (D,), sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731

    def block(x, p, mask):  # x (L, B, D): open_clip's nn.MultiheadAttention layout
        y = ln(x, p + "ln_1")
        y, _ = F.multi_head_attention_forward(
            y, y, y, D, HEADS, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
            attn_mask=mask)
        x = x + y
        y = F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        return x + F.linear(F.gelu(y), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])

    B = pixels.shape[0]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([sd["visual.class_embedding"].expand(B, 1, D), x], 1) + sd["visual.positional_embedding"]
    x = ln(x, "visual.ln_pre").transpose(0, 1)
    for i in range(LAYERS):
        x = block(x, f"visual.transformer.resblocks.{i}.", None)
    f_img = ln(x.transpose(0, 1)[:, 0], "visual.ln_post") @ sd["visual.proj"]

    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"]).transpose(0, 1)  # (L, B, D)
    mask = torch.full((CTX, CTX), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = block(x, f"transformer.resblocks.{i}.", mask)
    x = ln(x.transpose(0, 1), "ln_final")
    f_txt = x[torch.arange(B), ids.argmax(-1)] @ sd["text_projection"]
    return F.normalize(f_img, dim=-1), F.normalize(f_txt, dim=-1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("rewards"))


def write_files(root):
    """Tiny checkpoints on disk: HPS .pt, a CLIPModel folder (with tokenizer), an aesthetic MLP .pth."""
    tok = str(root / "tokenizer")
    vocab = write_tokenizer(tok)
    sd = random_openclip_state_dict(vocab)
    torch.save({"state_dict": sd, "epoch": 3}, root / "hps.pt")

    torch.manual_seed(2)
    cfg = CLIPConfig(projection_dim=EMBED, text_config=dict(
        hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=CTX, vocab_size=vocab, eos_token_id=vocab - 1, bos_token_id=vocab - 2),
        vision_config=dict(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, image_size=IMG, patch_size=PATCH))
    clip = CLIPModel(cfg).eval()
    clip.save_pretrained(root / "clip")
    write_tokenizer(str(root / "clip"))

    mlp = AestheticMLP(EMBED)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    torch.save(mlp.state_dict(), root / "mlp.pth")
    return dict(root=root, tok=tok, sd=sd, clip=clip, mlp=mlp)


def test_preprocess_matches_pil_bicubic():
    """Down- and up-scaling, with center crop of a non-square image, equal PIL's bicubic on float images."""
    torch.manual_seed(0)
    for H, W, S in [(64, 96, 24), (20, 20, 48)]:
        images = torch.rand(1, 3, H, W)
        ours = clip_preprocess(images, S)
        h, w = max(S, round(H * S / min(H, W))), max(S, round(W * S / min(H, W)))
        top, left = round((h - S) / 2), round((w - S) / 2)
        ref = torch.stack([torch.tensor(np.array(Image.fromarray(images[0, c].numpy(), mode="F").resize(
            (w, h), Image.BICUBIC)))[top:top + S, left:left + S] for c in range(3)])[None]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (rewards.OPENAI_MEAN, rewards.OPENAI_STD))
        assert ours.shape == (1, 3, S, S)
        assert rel_err(ours, (ref - mean) / std) < 1e-4


def test_hps_matches_openclip_reference(files):
    """The converted CLIPModel gives open_clip's features and HPS score = cos on a tiny random ViT."""
    hps = load_hps(str(files["root"] / "hps.pt"), files["tok"], vision_heads=HEADS, text_heads=HEADS)
    images = torch.rand(2, 3, 40, 48)
    ids = hps.tokenizer(PROMPTS, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt").input_ids
    f_img, f_txt = openclip_reference(files["sd"], clip_preprocess(images, IMG), ids)
    assert rel_err(hps.encode_images(images), f_img) < 1e-4
    assert rel_err(hps.encode_texts(PROMPTS), f_txt) < 1e-4
    assert rel_err(hps(images, PROMPTS), (f_img * f_txt).sum(-1)) < 1e-4
    assert not any(p.requires_grad for p in hps.parameters()) and not hps.model.training


def test_hps_bare_state_dict_and_strict_errors(files, tmp_path):
    sd = dict(files["sd"])
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "bare.pt")  # bare + DDP prefix: accepted
    load_hps(str(tmp_path / "bare.pt"), files["tok"], vision_heads=HEADS, text_heads=HEADS)
    sd.pop("visual.transformer.resblocks.1.ln_2.bias")
    sd["visual.extra"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"missing .*layers\.1\.layer_norm2\.bias.*unexpected .*visual\.extra"):
        load_hps(str(tmp_path / "bad.pt"), files["tok"], vision_heads=HEADS, text_heads=HEADS)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        load_hps(str(tmp_path / "junk.pt"), files["tok"])
    with pytest.raises(WeightsError, match="no CLIP tokenizer"):  # none given, none beside the .pt
        load_hps(str(tmp_path / "bare.pt"), vision_heads=HEADS, text_heads=HEADS)


def reference_clip(clip, images, prompts, tok):
    """transformers' own path: get_image_features / get_text_features on the same preprocessed pixels."""
    with torch.no_grad():
        ids = tok(prompts, padding="max_length", max_length=CTX, truncation=True, return_tensors="pt").input_ids
        f_img = rewards.pooled(clip.get_image_features(pixel_values=clip_preprocess(images, IMG)))
        f_txt = rewards.pooled(clip.get_text_features(input_ids=ids))
    return F.normalize(f_img, dim=-1), F.normalize(f_txt, dim=-1)


def test_pickscore_and_clip_score_equal_transformers(files):
    images = torch.rand(2, 3, 50, 40)
    pick = load_pickscore(str(files["root"] / "clip"))
    clip_score = load_clip_score(str(files["root"] / "clip"))
    f_img, f_txt = reference_clip(files["clip"], images, PROMPTS, pick.tokenizer)
    cos = (f_img * f_txt).sum(-1)
    assert rel_err(pick(images, PROMPTS), files["clip"].logit_scale.exp() * cos) < 1e-4
    assert rel_err(clip_score(images, PROMPTS), 100 * cos) < 1e-4


def test_aesthetic_equals_transformers_plus_mlp(files):
    images = torch.rand(2, 3, 32, 32)
    aes = load_aesthetic(str(files["root"] / "clip"), str(files["root"] / "mlp.pth"))
    f_img, _ = reference_clip(files["clip"], images, PROMPTS, load_pickscore(str(files["root"] / "clip")).tokenizer)
    x = f_img
    for i in (0, 2, 4, 6, 7):  # Linear layers; dropouts are identity at eval
        x = F.linear(x, files["mlp"].layers[i].weight, files["mlp"].layers[i].bias)
    aes.train()  # a parent's .train() must leave the frozen judge in eval mode
    assert not aes.mlp.training and rel_err(aes(images, PROMPTS), x.squeeze(-1)) < 1e-4
    torch.save({"layers.0.weight": torch.zeros(1024, EMBED)}, files["root"] / "bad.pth")
    with pytest.raises(WeightsError, match="aesthetic MLP .*missing"):
        load_aesthetic(str(files["root"] / "clip"), str(files["root"] / "bad.pth"))


def test_relative_reward_formula(files):
    """SRPO's f_img · ((1+k) f_txt(p+) − f_txt(p−)) for a CLIP reward (the one-image-pass fast path), equal to the
    generic (1+k) r(p+) − r(p−) every other reward gets."""
    pick = load_pickscore(str(files["root"] / "clip"))
    rel = RelativeReward(pick, positive="good.", negative="bad.", k=0.5)
    images = torch.rand(2, 3, 32, 32)
    f_img, f_pos = reference_clip(files["clip"], images, [f"good. {p}" for p in PROMPTS], pick.tokenizer)
    _, f_neg = reference_clip(files["clip"], images, [f"bad. {p}" for p in PROMPTS], pick.tokenizer)
    ref = files["clip"].logit_scale.exp() * (f_img * (1.5 * f_pos - f_neg)).sum(-1)
    assert rel_err(rel(images, PROMPTS), ref) < 1e-4
    generic = 1.5 * pick(images, [f"good. {p}" for p in PROMPTS]) - pick(images, [f"bad. {p}" for p in PROMPTS])
    assert rel_err(rel(images, PROMPTS), generic) < 1e-5


def test_gradients_reach_images_only(files):
    root = files["root"]
    hps = load_hps(str(root / "hps.pt"), files["tok"], vision_heads=HEADS, text_heads=HEADS)
    pick = load_pickscore(str(root / "clip"))
    for reward in (hps, pick, load_aesthetic(str(root / "clip"), str(root / "mlp.pth")), RelativeReward(pick)):
        images = torch.rand(2, 3, 36, 36, requires_grad=True)
        reward(images, PROMPTS).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0 and images.grad.isfinite().all()
        assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_parse_reward_spec(files, monkeypatch):
    root = files["root"]
    # the tiny HPS has 2 heads, not ViT-H-14's 16: register a maker with the test's head count
    monkeypatch.setitem(REWARDS, "hps", lambda path, tokenizer=None, device=None, dtype=None: load_hps(
        path, tokenizer, device, dtype, vision_heads=HEADS, text_heads=HEADS))
    monkeypatch.setitem(REWARDS, "const", lambda path, **kw: ConstReward(float(path or 1)))
    total = parse_reward_spec(f"pick:{root / 'clip'}=0.5,clip:{root / 'clip'},rel-hps:{root / 'hps.pt'}=-2,"
                              f"const:3,const=0.25", tokenizer=files["tok"])
    assert isinstance(total, WeightedSum) and list(total.rewards) == ["pick", "clip", "rel-hps", "const", "const_2"]
    assert isinstance(total.rewards["rel-hps"], RelativeReward)
    images = torch.rand(2, 3, 32, 32)
    score, parts = total.forward_parts(images, PROMPTS)
    assert rel_err(score, 0.5 * parts["pick"] + parts["clip"] - 2 * parts["rel-hps"] + 3 + 0.25) < 1e-6
    assert rel_err(parts["const"], torch.full((2,), 3.0)) == 0
    with pytest.raises(ValueError, match=r"unknown reward 'hsp'.*known: aesthetic, clip, const, hps, pick"):
        parse_reward_spec("hsp:x.pt")
    with pytest.raises(ValueError, match="weight 'abc'"):
        parse_reward_spec(f"pick:{root / 'clip'}=abc")
    rel_const = parse_reward_spec("rel-const:2").rewards["rel-const"]          # any reward: (1 + k) r(p+) - r(p-)
    assert isinstance(rel_const, RelativeReward) and torch.equal(rel_const(images, PROMPTS), torch.full((2,), 2.0))
    with pytest.raises(WeightsError, match="no config.json"):
        parse_reward_spec(f"pick:{root}")


class ConstReward(rewards.Reward):
    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, images, prompts):
        return torch.full((images.shape[0],), self.c)


def test_isinstance_contract():
    assert issubclass(CLIPReward, rewards.Reward) and issubclass(WeightedSum, rewards.Reward)


def test_hps_full_vit_h14_layout_converts_strictly():
    """The real HPSv2 layout (open_clip ViT-H-14, shapes from its config) maps onto CLIPModel key for key (meta)."""
    W_v, W_t, E, sd = 1280, 1024, 1024, {}
    with torch.device("meta"):
        sd.update({"visual.conv1.weight": torch.empty(W_v, 3, 14, 14), "visual.class_embedding": torch.empty(W_v),
                   "visual.positional_embedding": torch.empty(257, W_v), "visual.proj": torch.empty(W_v, E),
                   "token_embedding.weight": torch.empty(49408, W_t), "positional_embedding": torch.empty(77, W_t),
                   "text_projection": torch.empty(W_t, E), "logit_scale": torch.empty(())})
        for ln, w in (("visual.ln_pre", W_v), ("visual.ln_post", W_v), ("ln_final", W_t)):
            sd[f"{ln}.weight"], sd[f"{ln}.bias"] = torch.empty(w), torch.empty(w)
        for tower, w, n in (("visual.transformer", W_v, 32), ("transformer", W_t, 24)):
            for i in range(n):
                p = f"{tower}.resblocks.{i}."
                sd |= {p + "ln_1.weight": torch.empty(w), p + "ln_1.bias": torch.empty(w),
                       p + "ln_2.weight": torch.empty(w), p + "ln_2.bias": torch.empty(w),
                       p + "attn.in_proj_weight": torch.empty(3 * w, w), p + "attn.in_proj_bias": torch.empty(3 * w),
                       p + "attn.out_proj.weight": torch.empty(w, w), p + "attn.out_proj.bias": torch.empty(w),
                       p + "mlp.c_fc.weight": torch.empty(4 * w, w), p + "mlp.c_fc.bias": torch.empty(4 * w),
                       p + "mlp.c_proj.weight": torch.empty(w, 4 * w), p + "mlp.c_proj.bias": torch.empty(w)}
        config = rewards.hps_config(sd)
        model = CLIPModel(config)
    weights.check_state_dict(model, rewards.hps_to_transformers(sd), "ViT-H-14")
    v, t = config.vision_config, config.text_config
    assert (v.image_size, v.patch_size, v.num_hidden_layers, v.hidden_size // v.num_attention_heads) == (224, 14, 32, 80)
    assert (t.num_hidden_layers, t.hidden_size // t.num_attention_heads, config.projection_dim) == (24, 64, 1024)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in sd.values())  # 986M, nothing extra


def test_pickled_bin_folder_with_old_position_ids(files, tmp_path):
    """A folder with only pytorch_model.bin (old hub uploads, which also saved position_ids buffers) loads the same."""
    import shutil
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copy(files["root"] / "clip" / name, tmp_path / name)
    sd = files["clip"].state_dict() | {"text_model.embeddings.position_ids": torch.arange(CTX)[None]}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    images = torch.rand(2, 3, 32, 32)
    ref = load_pickscore(str(files["root"] / "clip"))(images, PROMPTS)
    assert rel_err(load_pickscore(str(tmp_path))(images, PROMPTS), ref) == 0


def test_bf16_model_fp32_scores(files):
    """bf16 weights (the CUDA setting): scores come back float32, gradients in the images' dtype."""
    path = str(files["root"] / "hps.pt")
    hps32 = load_hps(path, files["tok"], vision_heads=HEADS, text_heads=HEADS)
    hps16 = load_hps(path, files["tok"], vision_heads=HEADS, text_heads=HEADS, dtype=torch.bfloat16)
    images = torch.rand(2, 3, 40, 40)
    x = images.bfloat16().requires_grad_()
    scores = hps16(x, PROMPTS)
    scores.sum().backward()
    assert scores.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert rel_err(scores, hps32(images, PROMPTS)) < 0.1  # bf16 has 8 mantissa bits: a smoke test, not parity
