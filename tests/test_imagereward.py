"""ImageReward hosted in transformers' BlipForImageTextRetrieval (imagereward.py) against an independent forward pass
written here from the published architecture, on a tiny random checkpoint in the released ImageReward.pt layout.

The `image-reward` package itself cannot serve as the oracle here: its ViT needs timm (and timm torchvision, whose PyPI
wheel does not import beside this torch build) and its BERT imports transformers APIs that no longer exist. So
`reference` below re-implements ImageReward's forward from the original key layout: BLIP's timm-style ViT (pre-norm
blocks, LayerNorm eps 1e-6, class token, learned positions, final norm), BLIP's BERT text encoder (post-norm layers:
self-attention with the padding mask, cross-attention to every image token, GELU MLP; LayerNorm eps 1e-12), the first
token through the 5-layer MLP, then (score − mean) / std.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

import imagereward
from weights import WeightsError

V, VH, VL, P, IMG = 32, 2, 2, 8, 32          # vision width, heads, layers, patch, image size
T, TH, TL, VOCAB, POS = 24, 3, 2, 40, 16     # text width, heads, layers, vocabulary, positions
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "on", "blue", "sofa", "dog"]


def checkpoint() -> dict[str, torch.Tensor]:
    """A random state dict in ImageReward.pt's own layout (BLIP's key names)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    sd = {"blip.visual_encoder.patch_embed.proj.weight": r(V, 3, P, P), "blip.visual_encoder.patch_embed.proj.bias": r(V),
          "blip.visual_encoder.cls_token": r(1, 1, V), "blip.visual_encoder.pos_embed": r(1, (IMG // P) ** 2 + 1, V),
          "blip.visual_encoder.norm.weight": 1 + r(V), "blip.visual_encoder.norm.bias": r(V),
          "blip.vision_proj.weight": r(8, V), "blip.vision_proj.bias": r(8),
          "blip.text_proj.weight": r(8, T), "blip.text_proj.bias": r(8),
          "blip.text_encoder.embeddings.word_embeddings.weight": r(VOCAB, T),
          "blip.text_encoder.embeddings.position_embeddings.weight": r(POS, T),
          "blip.text_encoder.embeddings.LayerNorm.weight": 1 + r(T), "blip.text_encoder.embeddings.LayerNorm.bias": r(T),
          "blip.text_encoder.embeddings.position_ids": torch.arange(POS)[None]}       # a buffer the release holds
    for i in range(VL):
        b = f"blip.visual_encoder.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(V), b + "norm1.bias": r(V), b + "attn.qkv.weight": r(3 * V, V),
                   b + "attn.qkv.bias": r(3 * V), b + "attn.proj.weight": r(V, V), b + "attn.proj.bias": r(V),
                   b + "norm2.weight": 1 + r(V), b + "norm2.bias": r(V), b + "mlp.fc1.weight": r(4 * V, V),
                   b + "mlp.fc1.bias": r(4 * V), b + "mlp.fc2.weight": r(V, 4 * V), b + "mlp.fc2.bias": r(V)})
    for i in range(TL):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in (("attention", T), ("crossattention", V)):
            sd.update({b + f"{att}.self.query.weight": r(T, T), b + f"{att}.self.query.bias": r(T),
                       b + f"{att}.self.key.weight": r(T, kv), b + f"{att}.self.key.bias": r(T),
                       b + f"{att}.self.value.weight": r(T, kv), b + f"{att}.self.value.bias": r(T),
                       b + f"{att}.output.dense.weight": r(T, T), b + f"{att}.output.dense.bias": r(T),
                       b + f"{att}.output.LayerNorm.weight": 1 + r(T), b + f"{att}.output.LayerNorm.bias": r(T)})
        sd.update({b + "intermediate.dense.weight": r(4 * T, T), b + "intermediate.dense.bias": r(4 * T),
                   b + "output.dense.weight": r(T, 4 * T), b + "output.dense.bias": r(T),
                   b + "output.LayerNorm.weight": 1 + r(T), b + "output.LayerNorm.bias": r(T)})
    for j, (o, i) in zip((0, 2, 4, 6, 7), ((1024, T), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd.update({f"mlp.layers.{j}.weight": r(o, i) / math.sqrt(i), f"mlp.layers.{j}.bias": r(o)})
    return sd


def write_bert_tokenizer(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS + [f"[unused{i}]" for i in range(VOCAB - len(WORDS))]) + "\n")


def heads(x, n):
    return x.view(*x.shape[:2], n, -1).transpose(1, 2)                                  # (B, N, L, D)


def attend(q, k, v, n, mask=None):
    q, k, v = heads(q, n), heads(k, n), heads(v, n)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)


def reference(sd, images, ids, mask, mean=imagereward.MEAN, std=imagereward.STD):
    """ImageReward's forward from the original layout. images (B, 3, IMG, IMG) in [0, 1] (no resize needed)."""
    w = lambda k: sd[k]  # noqa: E731
    lin = lambda x, k: F.linear(x, w(k + ".weight"), w(k + ".bias"))  # noqa: E731
    ln = lambda x, k, eps: F.layer_norm(x, x.shape[-1:], w(k + ".weight"), w(k + ".bias"), eps)  # noqa: E731
    mu = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    sigma = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = F.conv2d((images - mu) / sigma, w("blip.visual_encoder.patch_embed.proj.weight"),
                 w("blip.visual_encoder.patch_embed.proj.bias"), stride=P).flatten(2).transpose(1, 2)
    x = torch.cat([w("blip.visual_encoder.cls_token").expand(len(x), -1, -1), x], 1) + w("blip.visual_encoder.pos_embed")
    for i in range(VL):
        b = f"blip.visual_encoder.blocks.{i}."
        q, k, v = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, v, VH), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(x, "blip.visual_encoder.norm", 1e-6)
    e = "blip.text_encoder."
    h = ln(F.embedding(ids, w(e + "embeddings.word_embeddings.weight")) +
           w(e + "embeddings.position_embeddings.weight")[:ids.shape[1]], e + "embeddings.LayerNorm", 1e-12)
    for i in range(TL):
        b = f"{e}encoder.layer.{i}."
        for att, kv, m in (("attention", h, mask), ("crossattention", img, None)):
            a = attend(lin(h, b + f"{att}.self.query"), lin(kv, b + f"{att}.self.key"),
                       lin(kv, b + f"{att}.self.value"), TH, m)
            h = ln(lin(a, b + f"{att}.output.dense") + h, b + f"{att}.output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)
    z = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{j}")
    return ((z.squeeze(-1) - mean) / std)


@pytest.fixture
def released(tmp_path):
    torch.save(checkpoint(), tmp_path / "ImageReward.pt")
    write_bert_tokenizer(tmp_path / "tokenizer")
    return tmp_path


def test_imagereward_matches_the_reference_forward_and_gradients_reach_the_images(released):
    ir = imagereward.load(str(released / "ImageReward.pt"), vision_heads=VH, text_heads=TH)
    assert ir.size == IMG and ir.max_length == POS and ir.model.blip.config.vision_config.layer_norm_eps == 1e-6
    prompts = ["a red cat on a blue sofa", "a dog"]
    images = torch.rand(2, 3, IMG, IMG, requires_grad=True)
    ours = ir(images, prompts)
    tok = ir.tokenizer(prompts, padding="max_length", max_length=POS, truncation=True, return_tensors="pt")
    assert tok.input_ids[0, 0] == WORDS.index("[CLS]") and tok.attention_mask[1].sum() == 4   # [CLS] a dog [SEP]
    ref = reference(checkpoint(), images, tok.input_ids, tok.attention_mask)
    err = rel_err(ours, ref)
    print(f"ImageReward vs reference forward: rel err {err:.2e}")
    assert err < 1e-4
    ours.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(not p.requires_grad for p in ir.parameters())
    big = torch.rand(2, 3, 50, 40)                                     # any size: resized, centre-cropped inside
    assert ir(big, prompts).shape == (2,)


def test_the_spec_and_strict_loading(released, monkeypatch):
    import functools
    import shutil
    import config
    monkeypatch.setattr(imagereward, "load", functools.partial(imagereward.load, vision_heads=VH, text_heads=TH))
    r = config.load_reward(f"imagereward:{released / 'ImageReward.pt'}")            # tokenizer/ beside the .pt
    x = torch.rand(1, 3, IMG, IMG)
    shutil.move(released / "tokenizer", released / "bert")                             # or named: PT+FOLDER
    r2 = config.load_reward(f"imagereward:{released / 'ImageReward.pt'}+{released / 'bert'}")
    assert r(x, ["a cat"]).shape == (1,) and torch.equal(r(x, ["a cat"]), r2(x, ["a cat"]))
    sd = checkpoint()
    sd.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.weight")
    torch.save(sd, released / "bad.pt")
    with pytest.raises(WeightsError, match=r"missing 1 \(blip.text_encoder.encoder.layer.1.crossattention.self.key"):
        imagereward.load(str(released / "bad.pt"), vision_heads=VH, text_heads=TH)
    torch.save({"foo": torch.zeros(2)}, released / "foreign.pt")
    with pytest.raises(WeightsError, match="not an ImageReward checkpoint"):
        imagereward.load(str(released / "foreign.pt"))


def test_release_layout_round_trips():
    import weights
    sd = {k: v for k, v in checkpoint().items() if not k.endswith("position_ids")}
    assert weights.rename(weights.rename(sd, imagereward.RULES), imagereward.TO_RELEASE).keys() == sd.keys()
