"""Every file the project writes goes through here: written in full to a temporary name beside the target, flushed,
fsynced, closed, then renamed over it (`os.replace` is atomic on POSIX), so a reader sees the old file or the new one,
never half of one. A failed write (full disk, no permission) removes the temporary file and raises FileError, a
ValueError whose message names the file: the scripts print it as one line and exit 2.
"""
from __future__ import annotations

import io
import json
import os
from typing import Callable

import torch


class FileError(ValueError):
    """A file that cannot be written or read as expected; the message names it."""


def _fsync_dir(folder: str) -> None:
    """Make a rename durable: fsync the folder that holds the new name (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write `path` through `write(f)` on a binary file object, atomically (see the module docstring)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, no permission, or Ctrl-C half-way: no temporary file is left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise FileError(f"cannot write {path}: {e.strerror or e}") from None
        raise
    _fsync_dir(folder)


def write_bytes(path: str, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (tensors made contiguous and moved to the CPU first)."""
    from safetensors.torch import save
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data)


def save_torch(path: str, obj) -> None:
    """A torch.save file (used for optimizer state only: tensors and plain containers, loaded with weights_only)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def save_image(path: str, image) -> None:
    """A PIL image, in the format its extension names."""
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise FileError(f"{path}: images are written as .png, .jpg or .webp")
    write_atomic(path, lambda f: image.save(f, format=fmt))


def read_json(path: str, what: str = "JSON file"):
    """A JSON file; missing, unreadable, not UTF-8 or not JSON is one FileError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileError(f"no such {what}: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FileError(f"{path}: not a readable {what}: {e}") from None


def append_line(path: str, line: str) -> None:
    """Append one line to a log (metrics.jsonl): flushed and fsynced, so a crash loses at most the line being written."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line.rstrip("\n") + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise FileError(f"cannot write {path}: {e.strerror or e}") from None
