"""The toy world's preference pairs (L_G's data and the toy preference model's training set), in Pick-a-Pic v2
layout so that prefs.py reads them as it reads the real thing.

Shape alphabet: B batch, H, W image size.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from toy import world

# NOTE: the rejected images cover the two things people mark down in real preference data: quality (blur, noise,
# washed-out, a colour cast, blotchy off-palette colours) and alignment (a wrong attribute or relation, a missing
# object). Without the last two kinds the preference model cannot see the errors reward hacking makes on the toy
# (objects that split into off-colour blotches or vanish); with them its score falls on hacked samples.
DEGRADATIONS = ("blur", "noise", "washed", "cast", "wrong", "missing", "tint")


def degrade(caption: str, seed: int, kind: str, rng: random.Random):
    """The rejected image of a pair: the clean render degraded, a render of a wrong-attribute twin caption, or the
    same layout with one object left out."""
    from PIL import ImageFilter
    if kind == "wrong":
        return world.render(world.twin(caption, rng), seed)
    if kind == "missing":  # a one-object caption leaves the empty canvas
        return world.render(caption, seed, omit=rng.randrange(len(world.parse(caption).objects)))
    img = world.render(caption, seed)
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.5)))
    x = world.to_tensor([img])
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        x = x + rng.uniform(0.08, 0.2) * torch.randn(x.shape, generator=g)
    elif kind == "washed":
        a = rng.uniform(0.3, 0.6)
        x = (1 - a) * x + a * 0.5
    elif kind == "cast":  # on one channel, over the whole image
        x[:, rng.randrange(3)] += rng.uniform(0.25, 0.5)
    else:  # tint: the objects pulled towards another palette colour by a smooth random amount (blotches)
        amount = rng.uniform(0.3, 0.7) * F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=x.shape[-2:],
                                                       mode="bilinear", align_corners=False)
        target = torch.tensor(world.PALETTE[rng.choice(world.COLOURS)]).view(1, 3, 1, 1) / 255
        x = x + (x.amax(1, keepdim=True) > 0.2) * amount * (target - x)
    return world.to_pil(x.clamp(0, 1))[0]


def make_pairs(n: int, split: str, seed: int) -> list[tuple[str, object, object, str]]:
    """n (caption, chosen, rejected, kind) with PIL images; kinds cycle through DEGRADATIONS."""
    rng, ps = random.Random(seed), world.prompts(split)
    out = []
    for i in range(n):
        c, kind = rng.choice(ps), DEGRADATIONS[i % len(DEGRADATIONS)]
        out.append((c, world.render(c, seed * 10**6 + i), degrade(c, seed * 10**6 + i, kind, rng), kind))
    return out


def write_prefs_parquet(pairs, path: str, seed: int) -> None:
    """Pick-a-Pic v2 layout: caption, jpg_0, jpg_1 (image bytes; PNG here, lossless), label_0, label_1."""
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(img) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    rng, rows = random.Random(seed), []
    for caption, chosen, rejected, _ in pairs:
        first = rng.random() < 0.5       # the preferred image on either side, as in Pick-a-Pic
        a, b = (chosen, rejected) if first else (rejected, chosen)
        rows.append({"caption": caption, "jpg_0": png(a), "jpg_1": png(b), "label_0": float(first),
                     "label_1": float(not first)})
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=512)


# ------------------------------------------------------------------------------------------------ hard negatives

# NOTE: the toy ImageReward learns composition from these: the kinds of error the judge counts (binding, relation,
# count, a missing object) and a wrong attribute, each as a (caption, image) pair that must score below the true one.
HARD_KINDS = ("swap", "flip", "count", "missing", "attribute")


def hard_negative(caption: str, kind: str, rng: random.Random) -> tuple[str, int | None, str]:
    """(negative caption, object to leave out of the image or None, the kind made) for a caption. swap: the two objects' colours
    exchanged (a binding error); flip: the relation reversed; count: one of the two objects alone; missing: the same
    caption, one object left out of its render; attribute: one object's colour or shape changed. A one-object caption
    gets an attribute change whatever the kind.
    NOTE: a negative caption stays in its caption's split (train / heldout): the swap of a train caption is often a
    held-out composition, and a reward that only ever saw those as negatives learns that held-out compositions are
    wrong (the first toy ImageReward scored held-out swap pairs at 29%, below chance). A swap that would cross
    becomes an attribute change; an attribute change picks among the changes that stay."""
    p = world.parse(caption)
    same = lambda c: world.is_heldout(c) == world.is_heldout(caption)
    objs = list(p.objects)
    if kind == "swap" and p.relation is not None and objs[0].colour != objs[1].colour:
        a, b = objs
        swapped = str(world.Prompt((world.Obj(b.colour, a.shape), world.Obj(a.colour, b.shape)), p.relation))
        if same(swapped):
            return swapped, None, kind
    if kind == "flip" and p.relation is not None:
        return str(world.Prompt(p.objects, world.FLIP[p.relation])), None, kind
    if kind == "count" and p.relation is not None:
        return str(world.Prompt((rng.choice(objs),))), None, kind
    if kind == "missing" and p.relation is not None:
        return caption, rng.randrange(len(objs)), kind
    used = {o.colour for o in objs}
    options = [str(world.Prompt(tuple(world.Obj(c, o.shape) if j == i else x for j, x in enumerate(objs)), p.relation))
               for i, o in enumerate(objs) for c in world.COLOURS if c not in used]
    options += [str(world.Prompt(tuple(world.Obj(o.colour, sh) if j == i else x for j, x in enumerate(objs)),
                                 p.relation)) for i, o in enumerate(objs) for sh in world.SHAPES if sh != o.shape]
    return rng.choice([c for c in options if same(c)] or options), None, "attribute"


def hard_pairs(captions: list[str], seeds: list[int], rng: random.Random, kinds=HARD_KINDS):
    """For each (caption, seed): its render, and a negative of one kind (cycling through `kinds`) that is either the
    wrong caption for this render or this caption's wrong render (half each; 'missing' is always the latter).
    -> (images (B, 3, H, W), negative captions [B], negative images (B, 3, H, W), kinds [B])."""
    pos = world.render_batch(captions, seeds)
    neg_caps, neg_imgs, used = [], [], []
    for i, (c, s) in enumerate(zip(captions, seeds)):
        kind = kinds[i % len(kinds)]
        nc, omit, made = hard_negative(c, kind, rng)
        if omit is not None:
            neg_caps.append(c), neg_imgs.append(world.to_tensor([world.render(c, s, omit=omit)])[0])
        elif rng.random() < 0.5:                                   # the wrong caption for the render
            neg_caps.append(nc), neg_imgs.append(pos[i])
        else:                                                      # the wrong caption's render for the caption
            neg_caps.append(c), neg_imgs.append(world.render_batch([nc], [s])[0])
        used.append(made)
    return pos, neg_caps, torch.stack(neg_imgs), used


def hard_negative_image(caption: str, seed: int, kind: str, rng: random.Random) -> torch.Tensor:
    """A wrong render for `caption` drawn from the same layout where one exists: (3, H, W) in [0, 1].

    positions: the two objects' centres exchanged (the relation reversed); colours: their colours exchanged (a binding
    error); missing: one object left out; morph: one object's outline blended 30-70% towards another shape (a square
    with rounded corners, a lumpy circle: the attribute errors a diffusion model makes); attribute: a changed
    caption's render (a one-object caption gets this for every kind but morph). A colour exchange whose scene is a
    composition of the other split becomes a position exchange, for the reason given in hard_negative."""
    p = world.parse(caption)
    if kind == "morph":
        i = rng.randrange(len(p.objects))
        other = rng.choice([s for s in world.SHAPES if s != p.objects[i].shape])
        return world.to_tensor([world.render(caption, seed, morph=(i, other, rng.uniform(0.3, 0.7)))])[0]
    if p.relation is not None:
        a, b = p.objects
        swapped = str(world.Prompt((world.Obj(b.colour, a.shape), world.Obj(a.colour, b.shape)), p.relation))
        if kind == "colours" and (a.colour == b.colour or world.is_heldout(swapped) != world.is_heldout(caption)):
            kind = "positions"
        if kind in world.EXCHANGES:
            return world.to_tensor([world.render(caption, seed, exchange=kind)])[0]
        if kind == "missing":
            return world.to_tensor([world.render(caption, seed, omit=rng.randrange(2))])[0]
    return world.to_tensor([world.render(hard_negative(caption, "attribute", rng)[0], seed)])[0]
