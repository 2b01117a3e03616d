"""Data-parallel training over PyTorch's own stack: `torchrun --nproc_per_node N train.py ...`.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK (and the rendezvous address); without them nothing here starts a process
group and every helper is the identity, so `python train.py` is the single-process path, unchanged.

What is distributed and what is not (train.py):
  * only the hypernetwork's trainable part is wrapped in DistributedDataParallel; the frozen generator, VAE, text
    encoder and reward are plain replicas on every rank (no gradients, no optimizer state, nothing to sync);
  * each step draws the *global* batch (prompts, x_T, trajectory steps, noise) from one seeded generator on every
    rank, and each rank takes its rows; preference pairs are dealt the same way. So N ranks with batch B consume
    exactly what one process with batch N·B does, and the result does not depend on how the batch is split;
  * the loss is a mean over the rank's B samples and DDP averages gradients over ranks: the global mean;
  * rank 0 alone writes checkpoints, metrics and samples; a checkpoint holds no rank or world size, so `--resume`
    works with any number of processes (keep N·B fixed to replay the same data).

Backends: gloo on CPU, nccl on CUDA (one GPU per process: cuda:LOCAL_RANK).
"""
from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's rows of a global batch of world x `batch` samples."""
        return slice(self.rank * batch, (self.rank + 1) * batch)


def init(device: str) -> tuple[Context, torch.device]:
    """Join the process group torchrun describes in the environment (none: single process, no group).

    -> (context, this process's device); "cuda" becomes cuda:LOCAL_RANK.
    """
    device = torch.device(device)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Context(), device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    # NOTE: when one process of the job dies, torchrun sends SIGTERM to the others; by default that kills them without
    # a word. Turned into a KeyboardInterrupt, it ends each of them like Ctrl-C: one line saying what is kept.
    signal.signal(signal.SIGTERM, _stopped_by_torchrun)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Context(rank, world), device


def _stopped_by_torchrun(signum, frame):
    raise KeyboardInterrupt(f"rank {os.environ.get('RANK')} stopped by torchrun (another process of the job ended)")


# What a collective raises on the survivors when a rank dies, before torchrun's SIGTERM arrives (gloo: the TCP pair
# closes; nccl: the communicator is aborted).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
              "remote process exited")


def lost_peer(error: BaseException, ctx: Context) -> KeyboardInterrupt | None:
    """The one-line stop for a collective that failed because another rank of the job died; None for other errors."""
    if ctx.world == 1 or not isinstance(error, RuntimeError) or not any(m in str(error) for m in _LOST_PEER):
        return None
    return KeyboardInterrupt(f"rank {ctx.rank} stopped: another process of the job ended (its connection closed)")


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, ctx: Context, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the trainable module under torchrun; the module itself otherwise.

    DDP broadcasts rank 0's parameters on construction, so every rank starts from the same (possibly resumed) state.
    """
    if not dist.is_initialized():
        return module
    return DDP(module, device_ids=[device] if device.type == "cuda" else None)


def sync_if(module: nn.Module, sync: bool):
    """Gradient accumulation over several forward/backward passes in one step: DDP all-reduces only in the pass run
    with sync=True (the last), the others accumulate locally. Wrap the forward *and* its backward."""
    return module.no_sync() if isinstance(module, DDP) and not sync else contextlib.nullcontext()


def mean(log: dict[str, float], ctx: Context) -> dict[str, float]:
    """Average logged scalars over ranks (every rank must call it, with the same keys)."""
    if ctx.world == 1:
        return log
    keys = list(log)                                # the same order on every rank (the same code made it)
    v = torch.tensor([float(log[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        v = v.cuda()
    dist.all_reduce(v)
    return {k: x / ctx.world for k, x in zip(keys, v.tolist())}


def broadcast(obj, ctx: Context):
    """Rank 0's value of a picklable object on every rank (e.g. P's calibrated key steps)."""
    if ctx.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, ctx: Context) -> list:
    """Every rank's value of a picklable object, in rank order, on every rank ([obj] without a group)."""
    if ctx.world == 1:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def deal(items: Iterable, batch: int, ctx: Context) -> Iterator:
    """Deal a stream to ranks in global batches: of every world x `batch` consecutive items this rank keeps its
    `batch` rows; an incomplete global batch at the end is dropped (as drop_last)."""
    if ctx.world == 1:
        yield from items
        return
    G, rows, buf = ctx.world * batch, ctx.rows(batch), []
    for x in items:
        buf.append(x)
        if len(buf) == G:
            yield from buf[rows]
            buf = []
