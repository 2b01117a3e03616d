"""The toy world: a captioned 32x32 image world in which the whole paper runs on a CPU in minutes.

What lives here (training the tiny models: toy_train.py; the prefs and evaluation stages: toy_eval.py):
  # ---- world       palette, shapes, relations; captions; train / held-out prompt splits; the renderer
  # ---- judge       rule-based ground truth from pixels: count, colour, shape, binding, position, overall
  # ---- tokenizer   a real CLIPTokenizer (vocab.json + merges.txt) whose BPE turns every world word into one token
  # ---- rewards     differentiable toy rewards behind the `Reward` contract: toy CLIP score, toy preference model
  # ---- assets      paths of the shipped files; `python toy.py build` rebuilds them all (see toy_train.py)

Shipped files (assets/toy/, rebuilt by `python toy.py build`):
  sd/          diffusers-style SD pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
  flux/        diffusers FLUX folder: transformer/, vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/
  clip/        the whole toy CLIPModel (vision + text towers), used by the toy CLIP score
  pref/        the toy preference model's head (HPS-like), on the frozen toy CLIP
  prefs.parquet  toy preference pairs in Pick-a-Pic layout (caption, jpg_0, jpg_1, label_0, label_1; PNG bytes)
  metrics.json   figures measured by the build (VAE PSNR, CLIP retrieval, judge accuracy of the base models)

Shape alphabet: B batch, C channels, H, W image size, K palette size.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")
SD_DIR, FLUX_DIR, CLIP_DIR, PREF_DIR = (os.path.join(ROOT, d) for d in ("sd", "flux", "clip", "pref"))
PREFS_PATH = os.path.join(ROOT, "prefs.parquet")
METRICS_PATH = os.path.join(ROOT, "metrics.json")

# ------------------------------------------------------------------------------------------------------------- world

SIZE = 32                                       # images are SIZE x SIZE RGB
SUPERSAMPLE = 4                                 # draw at 4x and box-filter down: anti-aliased edges
BACKGROUND = (0, 0, 0)
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0), "magenta": (255, 0, 255), "cyan": (0, 255, 255)}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
OBJ_SIZE = (10, 13)                             # bounding-box side in pixels, inclusive range
# Colour-shape bindings never seen inside a two-object prompt during training (they are seen alone). A prompt that
# uses one of them in a relation is held out: it measures compositional generalisation, as GenEval does.
HELDOUT_BINDINGS = frozenset({("red", "square"), ("green", "triangle"), ("blue", "circle"), ("cyan", "triangle")})


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str


@dataclass(frozen=True)
class Prompt:
    """A parsed caption: one object, or two objects and the relation of the first to the second."""
    objects: tuple[Obj, ...]
    relation: str | None = None

    def __str__(self) -> str:
        a = f"a {self.objects[0].colour} {self.objects[0].shape}"
        if self.relation is None:
            return a
        return f"{a} {self.relation} a {self.objects[1].colour} {self.objects[1].shape}"


def parse(caption: str) -> Prompt:
    """'a red circle left of a blue square' -> Prompt; ValueError for anything outside the world's grammar."""
    w = caption.strip().lower().split()

    def obj(i: int) -> Obj:
        if len(w) < i + 3 or w[i] != "a" or w[i + 1] not in PALETTE or w[i + 2] not in SHAPES:
            raise ValueError(f"not a toy-world caption: {caption!r} (expected e.g. 'a red circle left of a blue square')")
        return Obj(w[i + 1], w[i + 2])

    first = obj(0)
    if len(w) == 3:
        return Prompt((first,))
    rel_len = 2 if w[3] in ("left", "right") else 1
    rel = " ".join(w[3:3 + rel_len])
    if rel not in RELATIONS or len(w) != 3 + rel_len + 3:
        raise ValueError(f"not a toy-world caption: {caption!r} (relations: {', '.join(RELATIONS)})")
    return Prompt((first, obj(3 + rel_len)), rel)


def all_prompts() -> list[str]:
    """Every caption of the world: 18 single objects, then 1080 relations between two objects of different colours."""
    singles = [str(Prompt((Obj(c, s),))) for c in COLOURS for s in SHAPES]
    pairs = [str(Prompt((Obj(c1, s1), Obj(c2, s2)), r))
             for c1, s1, r, c2, s2 in itertools.product(COLOURS, SHAPES, RELATIONS, COLOURS, SHAPES) if c1 != c2]
    return singles + pairs


def is_heldout(caption: str) -> bool:
    p = parse(caption)
    return p.relation is not None and any((o.colour, o.shape) in HELDOUT_BINDINGS for o in p.objects)


def is_unseen(caption: str) -> bool:
    """A train-split relation that HyperAlign never trains on (a fixed third of them, by a stable hash)."""
    return parse(caption).relation is not None and not is_heldout(caption) and zlib.crc32(caption.encode()) % 3 == 0


SPLITS = ("train", "heldout", "all", "hyper-train", "unseen")


def prompts(split: str) -> list[str]:
    """'train' (18 singles + 648 relations: the toy models' training prompts), 'heldout' (432 relations with a
    colour-shape binding no model saw in a relation), 'all', and the train split divided for HyperAlign:
    'hyper-train' (467 prompts the hypernetwork trains on) and 'unseen' (the other 199 relations: new prompts from
    the distribution the base model knows, as the paper's test prompts are)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split in ("hyper-train", "unseen"):
        return [p for p in prompts("train") if is_unseen(p) == (split == "unseen")]
    return [p for p in all_prompts() if split == "all" or is_heldout(p) == (split == "heldout")]


def eval_prompts(split: str, n: int | None = 64, seed: int = 0) -> list[str]:
    """A fixed sample of n prompts of a split (None: all of them, shuffled): what the reported accuracies use."""
    ps = prompts(split)
    return random.Random(seed).sample(ps, len(ps) if n is None else min(n, len(ps)))


def training_prefs():
    """The toy preference pairs of the prompts HyperAlign trains on ('hyper-train'): the pairs of the 'unseen' and
    'heldout' prompts, which it is scored on, are dropped (prefs.Excluding)."""
    import prefs
    return prefs.Excluding(prefs.open_prefs(PREFS_PATH), prompts("unseen") + prompts("heldout"))


def _seed(caption: str, seed: int) -> int:
    return zlib.crc32(f"{seed}:{caption}".encode())      # stable across processes, unlike hash()


def layout(caption: str, seed: int = 0) -> list[tuple[Obj, int, int, int]]:
    """Place the prompt's objects: [(obj, size, cx, cy)] with centres in pixels, boxes inside the image, no overlap.

    Two objects in a relation are offset mostly along the relation's axis (|along| > 2 |across|), so the relation is
    unambiguous from the centroids.
    """
    p, rng = parse(caption), random.Random(_seed(caption, seed))
    sizes = [rng.randint(*OBJ_SIZE) for _ in p.objects]
    if p.relation is None:
        s = sizes[0]
        return [(p.objects[0], s, rng.randint(s // 2 + 1, SIZE - s // 2 - 1), rng.randint(s // 2 + 1, SIZE - s // 2 - 1))]
    sa, sb = sizes
    half = max(sa, sb) // 2 + 1
    gap = (sa + sb) // 2 + 2
    along = rng.randint(gap, SIZE - 2 * half)           # centre distance along the relation axis
    across = rng.randint(-(along // 3), along // 3)      # small offset across it
    a_lo = half + max(0, -across)                        # first object's across-coordinate range keeps both inside
    a_hi = SIZE - half - max(0, across)
    u0 = rng.randint(half, SIZE - half - along)          # coordinate along the axis of the earlier object
    v0 = rng.randint(a_lo, a_hi)
    first_before = p.relation in ("left of", "above")    # the first object has the smaller coordinate
    ua, ub = (u0, u0 + along) if first_before else (u0 + along, u0)
    va, vb = (v0, v0 + across) if first_before else (v0 + across, v0)
    if p.relation in ("left of", "right of"):
        return [(p.objects[0], sa, ua, va), (p.objects[1], sb, ub, vb)]
    return [(p.objects[0], sa, va, ua), (p.objects[1], sb, vb, ub)]


def render(caption: str, seed: int = 0, omit: int | None = None) -> Image.Image:
    """Draw the caption at random sizes and positions (deterministic in (caption, seed)); anti-aliased RGB.

    `omit` leaves the object of that index out of the same layout (the preference data's 'missing object' render).
    """
    k = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for i, (obj, s, cx, cy) in enumerate(layout(caption, seed)):
        if i == omit:
            continue
        x0, y0 = (cx - s / 2) * k, (cy - s / 2) * k
        x1, y1 = x0 + s * k - 1, y0 + s * k - 1
        fill = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # an upright triangle filling its box: apex at the top centre, base along the bottom
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((SIZE, SIZE), Image.BOX)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    x = (images.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]


def render_batch(captions: list[str], seeds: list[int] | int = 0) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]; seeds is one int per caption, or one base seed (caption i gets seed + i)."""
    seeds = [seeds + i for i in range(len(captions))] if isinstance(seeds, int) else seeds
    return to_tensor([render(c, s) for c, s in zip(captions, seeds)])


def grid(images: torch.Tensor, nrow: int = 8, scale: int = 4) -> Image.Image:
    """(B, 3, H, W) -> one PNG-able picture, nearest-upscaled so the 32px images can be seen."""
    B, _, H, W = images.shape
    ncol = (B + nrow - 1) // nrow
    canvas = torch.ones(3, ncol * (H + 2), nrow * (W + 2)) * 0.5
    for i in range(B):
        r, c = divmod(i, nrow)
        canvas[:, r * (H + 2) + 1:r * (H + 2) + 1 + H, c * (W + 2) + 1:c * (W + 2) + 1 + W] = images[i].clamp(0, 1)
    pic = to_pil(canvas[None])[0]
    return pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST)


# ------------------------------------------------------------------------------------------------------------- judge

_PAL = torch.tensor([BACKGROUND] + [PALETTE[c] for c in COLOURS], dtype=torch.float32) / 255    # (K, 3), 0 = bg
MIN_AREA = 16           # components smaller than this are specks, not objects (the smallest object has ~50 px)
MAX_DIST = 0.45         # a pixel further than this from every palette colour is 'other' (not any colour)


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal class (cls: (B, H, W) ints, 0 = background): label = min pixel index + 1.

    Labels are relaxed to the minimum over same-class neighbours until nothing changes (numpy: single-threaded).
    """
    B, H, W = cls.shape
    big = H * W + 1
    lab = np.where(cls > 0, np.arange(1, H * W + 1).reshape(1, H, W), big)
    # same-class links to the right and downwards (the other two directions are the same links seen backwards)
    right = (cls[:, :, 1:] == cls[:, :, :-1]) & (cls[:, :, 1:] > 0)
    down = (cls[:, 1:, :] == cls[:, :-1, :]) & (cls[:, 1:, :] > 0)
    while True:
        new = lab.copy()
        new[:, :, :-1] = np.where(right, np.minimum(new[:, :, :-1], lab[:, :, 1:]), new[:, :, :-1])
        new[:, :, 1:] = np.where(right, np.minimum(new[:, :, 1:], lab[:, :, :-1]), new[:, :, 1:])
        new[:, :-1, :] = np.where(down, np.minimum(new[:, :-1, :], lab[:, 1:, :]), new[:, :-1, :])
        new[:, 1:, :] = np.where(down, np.minimum(new[:, 1:, :], lab[:, :-1, :]), new[:, 1:, :])
        if np.array_equal(new, lab):
            return np.where(cls > 0, lab, 0)
        lab = new


def _shape_of(mask: np.ndarray) -> str:
    """Circle, square or triangle from a component's pixels: filled box corners, and mass in the top half."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = box.shape
    corners = np.mean([box[:2, :2].mean(), box[:2, -2:].mean(), box[-2:, :2].mean(), box[-2:, -2:].mean()])
    top = box[:h // 2].sum() / box.sum()        # an upright triangle keeps ~1/4 of its mass in the top half
    if corners >= 0.7:
        return "square"
    if top < 0.4:
        return "triangle"
    return "circle"


def detect(images: torch.Tensor) -> list[list[dict]]:
    """Objects found in each image: [{'colour', 'shape', 'cx', 'cy', 'area'}] (nearest-palette pixels, components)."""
    x = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()      # (B, H, W, 3)
    d = np.linalg.norm(x[..., None, :] - _PAL.numpy(), axis=-1)                    # (B, H, W, K)
    cls = np.where(d.min(-1) <= MAX_DIST, d.argmin(-1), 0)     # 'other' pixels (far from every colour) are background
    lab = _components(cls)
    found = []
    for b in range(x.shape[0]):
        objs = []
        ids, counts = np.unique(lab[b], return_counts=True)
        for i, n in zip(ids, counts):
            if i == 0 or n < MIN_AREA:
                continue
            m = lab[b] == i
            ys, xs = np.nonzero(m)
            objs.append({"colour": COLOURS[cls[b][m][0] - 1], "shape": _shape_of(m),
                         "cx": float(xs.mean()), "cy": float(ys.mean()), "area": int(n)})
        found.append(objs)
    return found


def _holds(relation: str, a: dict, b: dict) -> bool:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]          # from the first object to the second
    return {"left of": dx > abs(dy), "right of": -dx > abs(dy), "above": dy > abs(dx), "below": -dy > abs(dx)}[relation]


def judge(images: torch.Tensor, captions: list[str]) -> dict[str, torch.Tensor]:
    """Rule-based ground truth, per image, each in [0, 1] (B,): the non-differentiable judge no reward is tuned to.

    count:    the number of objects found equals the number asked for
    colour:   fraction of asked objects whose colour is present
    shape:    fraction of asked objects whose shape is present
    binding:  fraction of asked objects present with the right colour AND shape (GenEval's 'colour attribution')
    position: for a relation, both objects present (bound) and the relation holds between their centroids;
              1 for one-object prompts (nothing asked; `summary` averages position over relational prompts only)
    overall:  count and binding and position all right (GenEval's per-image success)
    """
    if images.ndim != 4 or images.shape[0] != len(captions):
        raise ValueError(f"judge: expected (B, 3, H, W) images and B captions, got {tuple(images.shape)} and {len(captions)}")
    keys = ("count", "colour", "shape", "binding", "position", "overall")
    out = {k: torch.zeros(len(captions)) for k in keys}
    for i, (objs, caption) in enumerate(zip(detect(images), captions)):
        p = parse(caption)
        n = len(p.objects)
        out["count"][i] = float(len(objs) == n)
        out["colour"][i] = sum(any(o["colour"] == q.colour for o in objs) for q in p.objects) / n
        out["shape"][i] = sum(any(o["shape"] == q.shape for o in objs) for q in p.objects) / n
        bound = [next((o for o in objs if (o["colour"], o["shape"]) == (q.colour, q.shape)), None) for q in p.objects]
        out["binding"][i] = sum(o is not None for o in bound) / n
        if p.relation is None:
            out["position"][i] = 1.0
        else:
            out["position"][i] = float(all(bound) and _holds(p.relation, bound[0], bound[1]))
        out["overall"][i] = float(out["count"][i] == 1 and out["binding"][i] == 1 and out["position"][i] == 1)
    return out


def summary(scores: dict[str, torch.Tensor], captions: list[str]) -> dict[str, float]:
    """Mean of each judge score; position averaged over relational prompts only."""
    rel = torch.tensor([parse(c).relation is not None for c in captions])
    res = {k: round(v.mean().item(), 4) for k, v in scores.items() if k != "position"}
    res["position"] = round(scores["position"][rel].mean().item(), 4) if rel.any() else float("nan")
    return res


# --------------------------------------------------------------------------------------------------------- tokenizer

def words() -> list[str]:
    """Every word of the world, in a fixed order."""
    return ["a", *COLOURS, *SHAPES, "left", "right", "of", "above", "below"]


def _bpe_merges(vocab_words: list[str]) -> list[tuple[str, str]]:
    """Learn byte-pair merges on the word list until every word is one symbol (CLIP's `</w>` end-of-word marker)."""
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in vocab_words]
    merges = []
    while any(len(s) > 1 for s in seqs):
        counts: dict[tuple[str, str], int] = {}
        for s in seqs:
            for pair in zip(s[:-1], s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = max(counts, key=lambda p: (counts[p], -len(p[0] + p[1]), p))   # most frequent; ties: shortest, then by name
        merges.append(best)
        for i, s in enumerate(seqs):
            j, out = 0, []
            while j < len(s):
                if j < len(s) - 1 and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
    return merges


def write_tokenizer(folder: str) -> None:
    """A real CLIPTokenizer folder (vocab.json, merges.txt, configs) for the world's words, 77-token contexts like SD.

    Vocabulary: special tokens, the lower-case letters alone and word-final (so any lower-case word still tokenizes),
    every merged symbol. Every world word round-trips to exactly one token (tested).
    """
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    merges = _bpe_merges(words())
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    symbols = ["<|startoftext|>", "<|endoftext|>"] + letters + [c + "</w>" for c in letters] + [a + b for a, b in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, indent=0)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                        unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>", model_max_length=77)
    tok.save_pretrained(folder)


def load_tokenizer(folder: str | None = None):
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(folder or os.path.join(SD_DIR, "tokenizer"))


# ----------------------------------------------------------------------------------------------------------- rewards
# Both follow rewards.py's contract: reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,), differentiable in the
# images, frozen. They are registered in rewards.REWARDS as "toy-clip" and "toy-pref" (path optional: the shipped one).
from torch import nn  # noqa: E402

import rewards  # noqa: E402


def toy_clip_score(path: str = "", tokenizer: str | None = None, device=None, dtype=None) -> "rewards.CLIPReward":
    """CLIP score (Hessel et al. 2021) with the toy CLIP: 100 · cos(f_img, f_txt)."""
    folder = path or CLIP_DIR
    return rewards.CLIPReward(rewards.load_clip_model(folder, device, dtype),
                              rewards.load_clip_tokenizer(tokenizer, folder), scale=100.0).freeze()


class PrefHead(nn.Module):
    """HPS-like head: r = cos(img(f_img), txt(f_txt)) + softplus(a) cos_CLIP, where f_img = [CLS, mean patch token]
    of the toy CLIP's vision tower, f_txt its pooled text state, and cos_CLIP the CLIP's own image-text cosine."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.img = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.txt = nn.Linear(width, width)
        self.a = nn.Parameter(torch.zeros(()))      # weight of the CLIP alignment term, softplus(0) = 0.69

    def forward(self, f_img: torch.Tensor, f_txt: torch.Tensor) -> torch.Tensor:
        E = self.width                              # f_img (B, 3E) = [CLS, patches, CLIP embedding]; f_txt (B, 2E)
        clip = F.cosine_similarity(f_img[:, 2 * E:], f_txt[:, E:], dim=-1)
        return F.cosine_similarity(self.img(f_img[:, :2 * E]), self.txt(f_txt[:, :E]), dim=-1) + F.softplus(self.a) * clip


class ToyPreference(rewards.Reward):
    """The toy preference model: PrefHead on the frozen toy CLIP's towers, trained with a Bradley-Terry loss on the
    toy preference pairs (as HPS is trained on HPD's)."""

    def __init__(self, clip, tokenizer, head: PrefHead):
        super().__init__()
        self.clip, self.tokenizer, self.head = clip, tokenizer, head
        self.freeze()

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        out = self.clip.vision_model(pixel_values=rewards.clip_preprocess(images, SIZE).to(self.clip.logit_scale.dtype))
        cls = out.pooler_output
        return torch.cat([cls, out.last_hidden_state[:, 1:].mean(1), self.clip.visual_projection(cls)], -1).float()

    @torch.no_grad()
    def text_features(self, prompts) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids.to(self.clip.logit_scale.device)
        pooled = self.clip.text_model(input_ids=ids).pooler_output
        return torch.cat([pooled, self.clip.text_projection(pooled)], -1).float()  # (B, 2E)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        rewards.check_inputs(images, prompts)
        dtype = self.head.a.dtype  # features come out in float32; the head may be bf16 (--reward-dtype)
        return self.head(self.image_features(images).to(dtype), self.text_features(prompts).to(dtype)).float()


def toy_preference(path: str = "", tokenizer: str | None = None, device=None, dtype=None) -> ToyPreference:
    """The shipped toy preference model (assets/toy/pref/: config.json naming its CLIP folder, head weights)."""
    from weights import build_and_load, read_config, read_safetensors
    folder = path or PREF_DIR
    cfg = read_config(folder)
    clip_folder = os.path.normpath(os.path.join(folder, cfg["clip"]))
    head = build_and_load(lambda: PrefHead(cfg["width"]), read_safetensors(os.path.join(folder, "model.safetensors")),
                          f"toy preference head {folder}", dtype, device)
    return ToyPreference(rewards.load_clip_model(clip_folder, device, dtype),
                         rewards.load_clip_tokenizer(tokenizer, clip_folder), head)


rewards.REWARDS.update({"toy-clip": toy_clip_score, "toy-pref": toy_preference})


# ------------------------------------------------------------------------------------------------------------ assets

def main(argv: list[str]) -> int:
    """`python toy.py build [--preset full|smoke] [--root DIR] [--stages clip,vae,...]`: rebuild the shipped files."""
    import argparse
    import toy_train
    p = argparse.ArgumentParser(description="Rebuild the toy world's shipped models and data (assets/toy/).")
    p.add_argument("command", choices=["build"])
    p.add_argument("--preset", default="full", choices=sorted(toy_train.PRESETS))
    p.add_argument("--root", default=ROOT)
    p.add_argument("--stages", default=",".join(toy_train.STAGES),
                   help=f"comma-separated subset of {','.join(toy_train.STAGES)}; later stages read earlier ones' files")
    a = p.parse_args(argv)
    stages = tuple(s for s in a.stages.split(",") if s)
    bad = [s for s in stages if s not in toy_train.STAGES]
    if bad:
        print(f"error: unknown stages {bad}; known: {','.join(toy_train.STAGES)}", file=sys.stderr)
        return 2
    toy_train.build(a.preset, a.root, stages)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
