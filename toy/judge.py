"""The toy world's judge: rule-based ground truth from pixels (GenEval in miniature), never a training signal.

    detect(images)           objects found: nearest-palette pixels, 4-connected components, shape from the mask
    judge(images, captions)  count, colour, shape, binding, position, overall per image
    summary(scores, captions)  mean of each (position over relational prompts only)

Shape alphabet: B batch, H, W image size, K palette size (+ background).
"""
from __future__ import annotations

import numpy as np
import torch

from toy.world import BACKGROUND, COLOURS, PALETTE, parse

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
    """Circle, square or triangle from a component's pixels: mass in the top half, then filled box corners.

    An upright triangle keeps ~1/4 of its mass in the top half (renders 0.24-0.27, the toy models' samples
    0.24-0.33), squares and circles ~1/2. The 2 x 2 corners of the box are full for a square's render, empty for a
    circle's (at most 1/4); a diffusion model's squares have softer corners (5th-95th percentile 0.38-1.0 on toy SD
    samples), its circles none (at most 0.13): squares from 0.3 on.
    NOTE: toy world v1's judge asked for corners >= 0.7 and called 61% of toy SD's squares circles, most of them
    squares to the eye (docs/results.md §1)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = box.shape
    corners = np.mean([box[:2, :2].mean(), box[:2, -2:].mean(), box[-2:, :2].mean(), box[-2:, -2:].mean()])
    top = box[:h // 2].sum() / box.sum()
    if top < 0.4:
        return "triangle"
    if corners >= 0.3:
        return "square"
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
