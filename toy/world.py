"""The toy world: a captioned 32x32 image world in which the whole paper runs on a CPU in minutes.

  # ---- world       palette, shapes, relations; captions; train / held-out prompt splits; the renderer
  # ---- twins       hard-negative captions (the same words re-bound, or the relation reversed)
  # ---- tokenizer   a real CLIPTokenizer (vocab.json + merges.txt) whose BPE turns every world word into one token

The rest of the package: judge.py (rule-based ground truth from pixels), rewards.py (toy rewards), data.py (toy
preference pairs), build.py (`python -m toy build`: training the tiny models and writing them in the real formats).

Shipped files (assets/toy/, rebuilt by `python -m toy build`):
  sd/          diffusers-style SD pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
  flux/        diffusers FLUX folder: transformer/, vae/, text_encoder{,_2}/, tokenizer{,_2}/, scheduler/
  clip/        the whole toy CLIPModel (vision + text towers), used by the toy CLIP score
  pref/        the toy preference model's head (HPS-like), on the frozen toy CLIP
  ir/          the toy ImageReward (ImageReward.pt in the released layout, a BERT tokenizer, config.json)
  prefs.parquet  toy preference pairs in Pick-a-Pic layout (caption, jpg_0, jpg_1, label_0, label_1; PNG bytes)
  metrics.json   figures measured by the build (VAE PSNR, CLIP retrieval, judge accuracy of the base models)

Shape alphabet: B batch, C channels, H, W image size.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")
SD_DIR, FLUX_DIR, CLIP_DIR, PREF_DIR, IR_DIR, COMP_DIR = (os.path.join(ROOT, d) for d in
                                                           ("sd", "flux", "clip", "pref", "ir", "comp"))
PREFS_PATH = os.path.join(ROOT, "prefs.parquet")

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


def hyper_split(caption: str) -> str:
    """Where a train-split caption goes for HyperAlign, by a stable hash: 'unseen' (a third of the relations: scored,
    never trained on), 'val' (a quarter of the rest of the relations: settings are chosen on it), else 'hyper-train'."""
    p = parse(caption)
    h = zlib.crc32(caption.encode())
    if p.relation is None or is_heldout(caption):
        return "hyper-train"
    return "unseen" if h % 3 == 0 else "val" if (h // 3) % 4 == 0 else "hyper-train"


SPLITS = ("train", "heldout", "all", "hyper-train", "val", "unseen")


def prompts(split: str) -> list[str]:
    """'train' (18 singles + 648 relations: the toy models' training prompts), 'heldout' (432 relations with a
    colour-shape binding no model saw in a relation), 'all', and the train split divided for HyperAlign:
    'hyper-train' (the prompts the hypernetwork trains on), 'val' (held out of them to choose settings on) and
    'unseen' (199 relations never trained on: new prompts from the distribution the base model knows, as the paper's
    test prompts are; reported, never tuned on)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split in ("hyper-train", "val", "unseen"):
        return [p for p in prompts("train") if hyper_split(p) == split]
    return [p for p in all_prompts() if split == "all" or is_heldout(p) == (split == "heldout")]


GROUPINGS = ("relation", "shapes")


def group(caption: str, grouping: str) -> str:
    """The group of a caption: its relation ("left of", ..., "none" for one object), or the set of shapes it asks for
    ("circle+square"). The prompt groups of the per-group oracle LoRAs (methods.Oracle)."""
    p = parse(caption)
    if grouping == "relation":
        return p.relation or "none"
    if grouping == "shapes":
        return "+".join(sorted(o.shape for o in p.objects))
    raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")


def eval_prompts(split: str, n: int | None = 64, seed: int = 0) -> list[str]:
    """A fixed sample of n prompts of a split (None: all of them, shuffled): what the reported accuracies use."""
    ps = prompts(split)
    return random.Random(seed).sample(ps, len(ps) if n is None else min(n, len(ps)))


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


EXCHANGES = ("positions", "colours")


def exchanged(placed: list[tuple[Obj, int, int, int]], what: str) -> list[tuple[Obj, int, int, int]]:
    """The same layout with the two objects' positions (centres) or colours exchanged: the relation reversed, or the
    bindings swapped, and nothing else changed (the hard negatives of the composition reward; its accuracy table).
    Both objects fit at either centre, and the centres stay as far apart as before, so nothing overlaps."""
    if len(placed) != 2 or what not in EXCHANGES:
        raise ValueError(f"exchange needs a two-object layout and one of {EXCHANGES}, got {len(placed)} / {what!r}")
    (a, sa, xa, ya), (b, sb, xb, yb) = placed
    if what == "positions":
        return [(a, sa, xb, yb), (b, sb, xa, ya)]
    return [(Obj(b.colour, a.shape), sa, xa, ya), (Obj(a.colour, b.shape), sb, xb, yb)]


def outline(shape: str, x0: float, y0: float, x1: float, y1: float, n: int = 96) -> np.ndarray:
    """The shape's boundary in the box (x0, y0)-(x1, y1) as n points, one per direction from the box centre (n, 2):
    the same directions for every shape, so that two outlines can be blended point by point (`render`'s morph)."""
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    u = np.stack([np.cos(a), np.sin(a)], 1)                                  # unit directions (x right, y down)
    if shape == "circle":
        r = np.ones(n)
    elif shape == "square":
        r = 1 / np.abs(u).max(1)
    else:                                  # the upright triangle: apex (0, -1), base corners (±1, 1), box-normalised
        corners = np.array([[0, -1], [1, 1], [-1, 1], [0, -1]], float)
        r = np.full(n, np.inf)
        for p, q in zip(corners[:-1], corners[1:]):                           # ray from the centre against each edge
            d = q - p
            den = u[:, 0] * d[1] - u[:, 1] * d[0]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (p[0] * d[1] - p[1] * d[0]) / den                          # distance along the ray
                v = (p[0] * u[:, 1] - p[1] * u[:, 0]) / den                    # position along the edge
            ok = (np.abs(den) > 1e-12) & (t > 0) & (v >= -1e-9) & (v <= 1 + 1e-9)
            r = np.where(ok, np.minimum(r, t), r)
    return np.stack([cx + hw * r * u[:, 0], cy + hh * r * u[:, 1]], 1)


def render(caption: str, seed: int = 0, omit: int | None = None, exchange: str | None = None,
           morph: tuple[int, str, float] | None = None) -> Image.Image:
    """Draw the caption at random sizes and positions (deterministic in (caption, seed)); anti-aliased RGB.

    `omit` leaves the object of that index out of the same layout (the preference data's 'missing object' render);
    `exchange` ("positions" or "colours") draws the same layout with the two objects' centres or colours exchanged;
    `morph` (i, shape, w) draws object i with its outline blended a fraction w towards `shape`'s (a square with
    rounded corners, a circle flattened towards a square, ...): an attribute error of graded size.
    """
    k = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * k, SIZE * k), BACKGROUND)
    draw = ImageDraw.Draw(img)
    placed = layout(caption, seed)
    for i, (obj, s, cx, cy) in enumerate(exchanged(placed, exchange) if exchange else placed):
        if i == omit:
            continue
        x0, y0 = (cx - s / 2) * k, (cy - s / 2) * k
        x1, y1 = x0 + s * k - 1, y0 + s * k - 1
        fill = PALETTE[obj.colour]
        if morph is not None and morph[0] == i:
            (_, other, w), box = morph, (x0, y0, x1, y1)
            draw.polygon([tuple(p) for p in (1 - w) * outline(obj.shape, *box) + w * outline(other, *box)], fill=fill)
        elif obj.shape == "circle":
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


# ------------------------------------------------------------------------------------------------------------- twins

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def twin(caption: str, rng: random.Random) -> str:
    """A hard negative of a train caption: the same words re-bound (swapped colours or shapes) or the relation
    reversed; always a train caption too (a re-binding that lands on a held-out prompt falls back to the reversal)."""
    t = _twin(caption, rng)
    return t if is_heldout(t) == is_heldout(caption) else str(Prompt(parse(caption).objects,
                                                                                  FLIP[parse(caption).relation]))


def _twin(caption: str, rng: random.Random) -> str:
    p = parse(caption)
    if p.relation is None:
        o = p.objects[0]
        if rng.random() < 0.5:
            return str(Prompt((Obj(rng.choice([c for c in COLOURS if c != o.colour]), o.shape),)))
        return str(Prompt((Obj(o.colour, rng.choice([s for s in SHAPES if s != o.shape])),)))
    a, b = p.objects
    r = rng.random()
    if r < 0.4 or (r >= 0.7 and a.shape == b.shape):
        return str(Prompt((a, b), FLIP[p.relation]))
    if r < 0.7:
        return str(Prompt((Obj(b.colour, a.shape), Obj(a.colour, b.shape)), p.relation))
    return str(Prompt((Obj(a.colour, b.shape), Obj(b.colour, a.shape)), p.relation))


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


def tokenize(tokenizer, captions: list[str], length: int = 77) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
