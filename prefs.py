"""Preference data for the regularisation loss L_G: (prompt, preferred image, rejected image), streamed lazily.

L_G noises *preferred* images and asks the modulated model to denoise them (Pick-a-Pic for SD1.5, HPDv2 for FLUX),
so what training needs is a stream of (prompt, chosen) pairs; the rejected image comes along for analyses and for
DPO-style losses. Nothing is loaded up front: Pick-a-Pic v2 (~300 GB of parquet) is read one record batch at a time.

    PickAPic(path)    Pick-a-Pic v2 parquet shards (caption, jpg_0, jpg_1 as JPEG bytes, label_0, label_1); ties dropped
    HPD(path)         HPDv2 train.json = [{prompt, file_path: [..], human_preference: [..]}] + image folder
    JSONLPrefs(path)  one {"prompt", "chosen", "rejected"} per line, image paths relative to the file's folder
    open_prefs(path)  picks the reader from the path
    pref_batches(pairs, batch_size, resolution)  ->  {"prompts", "chosen" (B, 3, R, R) in [-1, 1], "rejected"}

Each reader is an iterable: iterating again starts another epoch. A bad record (corrupt image, missing file,
malformed labels) raises a PrefsError naming it (file and row / line / entry), or with `on_error="skip"` is skipped
and counted in `reader.skipped` (ties in `reader.ties`), never turned into a silent wrong pair.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

import distributed


class PrefsError(ValueError):
    """A preference record (or file) that cannot be read; the message names it."""


@dataclass
class PrefPair:
    prompt: str
    chosen: Image.Image  # RGB, the image people preferred
    rejected: Image.Image  # RGB
    where: str  # the record, e.g. "train-00001.parquet row 17", for messages


def load_image(src: bytes | str | None, where: str) -> Image.Image:
    """Decode JPEG/PNG bytes or a file into RGB, fully (so a truncated file fails here, not later)."""
    if src is None:
        raise PrefsError(f"{where}: no image")
    what = f"image file {src}" if isinstance(src, str) else "image bytes"
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError:
        raise PrefsError(f"{where}: missing {what}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PrefsError(f"{where}: unreadable {what}: {e}") from None


class _Reader:
    """Shared iteration: `_records()` yields (where, record); `_pairs(where, record)` -> pairs ([] for a tie)."""

    def __init__(self, path: str, on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not os.path.exists(path):
            raise PrefsError(f"no such file or folder: {path}")
        self.path, self.on_error = path, on_error
        self.yielded = self.skipped = self.ties = 0  # counts of the current / last pass

    def __iter__(self) -> Iterator[PrefPair]:
        self.yielded = self.skipped = self.ties = 0
        for where, record in self._records():
            try:
                pairs = self._pairs(where, record)
            except PrefsError:
                if self.on_error == "raise":
                    raise
                self.skipped += 1
                continue
            self.ties += not pairs
            self.yielded += len(pairs)
            yield from pairs

    def _records(self) -> Iterator[tuple[str, object]]:
        raise NotImplementedError

    def _pairs(self, where: str, record) -> list[PrefPair]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path!r}: {self.yielded} pairs, {self.ties} ties dropped, "
                f"{self.skipped} bad records skipped)")


# ----------------------------------------------------------------------------------------------------------- Pick-a-Pic

def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Pick-a-Pic parquet shards needs pyarrow (pip install pyarrow); "
                          "HPDv2 and JSONL preference files do not") from None
    return pq


class PickAPic(_Reader):
    """Pick-a-Pic v2 (Kirstain et al. 2023): a parquet shard, or a folder of shards streamed in name order.

    In a folder, only the `{split}-*.parquet` shards are read when there are any (the hub layout keeps train /
    validation / test shards side by side in data/), else every *.parquet. label_0 = 1 means jpg_0 was preferred;
    (0.5, 0.5) is a tie, dropped: it says nothing about which image is better.
    """

    COLUMNS = ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]

    def __init__(self, path: str, on_error: str = "raise", split: str = "train", rows_per_read: int = 64):
        super().__init__(path, on_error)
        self.split, self.rows_per_read = split, rows_per_read
        self.files = [path] if os.path.isfile(path) else self._shards(path, split)
        if not self.files:
            raise PrefsError(f"no .parquet files in {path}")
        _parquet()  # fail now, not at the first batch

    @staticmethod
    def _shards(folder: str, split: str) -> list[str]:
        files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
        in_split = [f for f in files if os.path.basename(f).startswith(f"{split}-")]
        return in_split or files

    def _records(self) -> Iterator[tuple[str, dict]]:
        pq = _parquet()
        for path in self.files:
            name = os.path.basename(path)
            try:
                shard = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a truncated or foreign file
                raise PrefsError(f"{path}: not a readable parquet file: {e}") from None
            missing = [c for c in self.COLUMNS if c not in shard.schema_arrow.names]
            if missing:
                raise PrefsError(f"{path}: not a Pick-a-Pic shard, missing columns {missing}")
            row = 0
            # NOTE: iter_batches decodes one row group at a time and slices it, so memory stays at one row group.
            for batch in shard.iter_batches(batch_size=self.rows_per_read, columns=self.COLUMNS):
                for record in batch.to_pylist():
                    yield f"{name} row {row}", record
                    row += 1

    def _pairs(self, where: str, r: dict) -> list[PrefPair]:
        labels = (r["label_0"], r["label_1"])
        if labels == (0.5, 0.5):
            return []
        if labels not in ((1, 0), (0, 1)):
            raise PrefsError(f"{where}: labels (label_0, label_1) = {labels}, expected (1, 0), (0, 1) or a tie")
        if not isinstance(r["caption"], str):
            raise PrefsError(f"{where}: caption is {r['caption']!r}")
        chosen, rejected = ("jpg_0", "jpg_1") if labels == (1, 0) else ("jpg_1", "jpg_0")
        return [PrefPair(r["caption"], load_image(r[chosen], f"{where} {chosen}"),
                         load_image(r[rejected], f"{where} {rejected}"), where)]


# ---------------------------------------------------------------------------------------------------------------- HPDv2

class HPD(_Reader):
    """HPDv2 (Wu et al. 2023): train.json + image folder (default: the folder named after the json beside it,
    HPDv2/train/ for HPDv2/train.json, else the json's own folder). The highest human_preference is the chosen image;
    a record with more than two images gives one pair per less-preferred image; equal preferences are a tie.

    NOTE: the json itself is parsed whole (Python's json cannot stream a top-level list); the images are read lazily.
    """

    def __init__(self, path: str, on_error: str = "raise", image_root: str | None = None):
        super().__init__(path, on_error)
        if image_root is None:
            beside = os.path.splitext(path)[0]
            image_root = beside if os.path.isdir(beside) else os.path.dirname(os.path.abspath(path))
        self.image_root = image_root

    def _records(self) -> Iterator[tuple[str, dict]]:
        try:
            with open(self.path) as f:
                entries = json.load(f)
        except (OSError, ValueError) as e:
            raise PrefsError(f"{self.path}: not a readable HPDv2 json file: {e}") from None
        if not isinstance(entries, list):
            raise PrefsError(f"{self.path}: expected a list of records, got {type(entries).__name__}")
        name = os.path.basename(self.path)
        for i, entry in enumerate(entries):
            yield f"{name} entry {i}", entry

    def _pairs(self, where: str, r) -> list[PrefPair]:
        if not isinstance(r, dict) or not {"prompt", "file_path", "human_preference"} <= set(r):
            raise PrefsError(f"{where}: expected keys prompt, file_path, human_preference")
        files, prefs = r["file_path"], r["human_preference"]
        if not isinstance(files, list) or not isinstance(prefs, list) or len(files) != len(prefs) or len(files) < 2:
            raise PrefsError(f"{where}: file_path and human_preference must be lists of the same length >= 2")
        if not all(isinstance(v, (int, float)) for v in prefs) or not all(isinstance(f, str) for f in files):
            raise PrefsError(f"{where}: human_preference must hold numbers and file_path strings")
        best = max(range(len(prefs)), key=lambda j: prefs[j])
        worse = [j for j in range(len(prefs)) if prefs[j] < prefs[best]]
        if not worse:
            return []
        chosen = load_image(os.path.join(self.image_root, files[best]), where)
        return [PrefPair(r["prompt"], chosen, load_image(os.path.join(self.image_root, files[j]), where), where)
                for j in worse]


# ---------------------------------------------------------------------------------------------------------------- JSONL

class JSONLPrefs(_Reader):
    """One {"prompt", "chosen", "rejected"} object per line; image paths relative to `image_root` (default: the
    .jsonl file's folder). Blank lines are ignored."""

    def __init__(self, path: str, on_error: str = "raise", image_root: str | None = None):
        super().__init__(path, on_error)
        self.image_root = image_root or os.path.dirname(os.path.abspath(path))

    def _records(self) -> Iterator[tuple[str, str]]:
        name = os.path.basename(self.path)
        with open(self.path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    yield f"{name} line {i}", line

    def _pairs(self, where: str, line: str) -> list[PrefPair]:
        try:
            r = json.loads(line)
        except ValueError as e:
            raise PrefsError(f"{where}: not JSON: {e}") from None
        if not isinstance(r, dict) or not all(isinstance(r.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise PrefsError(f"{where}: expected string fields prompt, chosen, rejected")
        return [PrefPair(r["prompt"], load_image(os.path.join(self.image_root, r["chosen"]), where),
                         load_image(os.path.join(self.image_root, r["rejected"]), where), where)]


class Excluding:
    """The pairs of `reader` whose prompt is not one of `prompts`.

    NOTE: L_G's preference data must not contain the prompts the hypernetwork is scored on; the paper trains on
    Pick-a-Pic / HPD prompts and tests on other sets. The toy pairs cover every train-split caption, so train.py
    drops the evaluation prompts from them (`toy.training_prefs`)."""

    def __init__(self, reader, prompts):
        self.reader, self.prompts = reader, {p.strip() for p in prompts}
        self.excluded = 0  # pairs dropped in the current / last pass

    def __iter__(self) -> Iterator[PrefPair]:
        self.excluded = 0
        for pair in self.reader:
            if pair.prompt.strip() in self.prompts:
                self.excluded += 1
            else:
                yield pair

    def __repr__(self) -> str:
        return f"Excluding({self.reader!r}, {len(self.prompts)} prompts: {self.excluded} pairs dropped)"


def open_prefs(path: str, on_error: str = "raise", **kwargs) -> _Reader:
    """The reader for `path`: *.parquet or a folder of them -> PickAPic; *.json or a folder with train.json -> HPD;
    *.jsonl or a folder with exactly one -> JSONLPrefs."""
    if os.path.isfile(path):
        for ext, reader in ((".parquet", PickAPic), (".json", HPD), (".jsonl", JSONLPrefs)):
            if path.endswith(ext):
                return reader(path, on_error, **kwargs)
    elif os.path.isdir(path):
        if glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True):
            return PickAPic(path, on_error, **kwargs)
        if os.path.isfile(os.path.join(path, "train.json")):
            return HPD(os.path.join(path, "train.json"), on_error, **kwargs)
        jsonl = glob.glob(os.path.join(path, "*.jsonl"))
        if len(jsonl) == 1:
            return JSONLPrefs(jsonl[0], on_error, **kwargs)
    else:
        raise PrefsError(f"no such file or folder: {path}")
    raise PrefsError(f"{path}: not a preference data set (expected Pick-a-Pic .parquet shards, an HPDv2 train.json, "
                     f"or a .jsonl of {{prompt, chosen, rejected}})")


# -------------------------------------------------------------------------------------------------------------- batches

def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Short side to `resolution` (bicubic), center crop, -> (3, R, R) in [-1, 1], the VAE's input range."""
    w, h = image.size
    scale = resolution / min(w, h)
    w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (w, h) != image.size:
        image = image.resize((w, h), Image.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.array(image, dtype=np.float32))  # (R, R, 3) in [0, 255]
    return x.permute(2, 0, 1) / 127.5 - 1.0


def pref_batches(pairs: Iterable[PrefPair], batch_size: int, resolution: int, rejected: bool = False,
                 drop_last: bool = False) -> Iterator[dict]:
    """Group pairs into batches {"prompts": [B], "chosen": (B, 3, R, R), "rejected": (B, 3, R, R) if asked}."""
    buf: list[PrefPair] = []

    def collate(items: list[PrefPair]) -> dict:
        batch = {"prompts": [p.prompt for p in items],
                 "chosen": torch.stack([image_to_tensor(p.chosen, resolution) for p in items])}
        if rejected:
            batch["rejected"] = torch.stack([image_to_tensor(p.rejected, resolution) for p in items])
        return batch

    for pair in pairs:
        buf.append(pair)
        if len(buf) == batch_size:
            yield collate(buf)
            buf = []
    if buf and not drop_last:
        yield collate(buf)


def stream(reader, batch_size: int, resolution: int, skip_batches: int = 0, ctx=None, rejected: bool = False
           ) -> Iterator[dict]:
    """Endless batches of preferred images for L_G (and the rejected ones too, for DPO / KTO), epoch after epoch, the
    first `skip_batches` skipped (a resumed run continues where it stopped). Under torchrun (`ctx`, a
    distributed.Context) each rank gets its `batch_size` rows of every global batch of pairs. An epoch with fewer
    pairs than one global batch is an error."""
    ctx = ctx or distributed.Context()

    def epochs():
        while True:
            pairs = distributed.deal(iter(reader), batch_size, ctx)
            n = 0
            for n, batch in enumerate(pref_batches(pairs, batch_size, resolution, rejected, drop_last=True), 1):
                yield batch
            if n == 0:
                raise PrefsError(f"preference data {reader!r}: fewer pairs than one batch of {batch_size * ctx.world}")
    return itertools.islice(epochs(), skip_batches, None)
