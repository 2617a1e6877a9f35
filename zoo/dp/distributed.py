"""Multi-process DP-SGD on ``torch.distributed``: several processes (GPUs, or CPU processes with gloo) run one
DP-SGD step together and give the result a single process would.

Launch any zoo training with ``torchrun``: ``torchrun --standalone --nproc_per_node 4 --no-python zoo train NAME
...`` (or call :func:`zoo.train` from a script started by torchrun). :func:`zoo.training.engine.train` sees ``WORLD_SIZE``
and joins the process group (NCCL on GPUs, gloo on CPUs); each rank uses GPU ``LOCAL_RANK``.

How one step is split (the guarantee of :mod:`zoo.privacy` is unchanged, because the released gradient has exactly
the distribution a single process releases):
  1. Every rank draws the same Poisson batch from the step's seeded generator (the seed is drawn on rank 0 and
     broadcast), so the logical batch is the one a single process would draw: each sample joins with rate q.
  2. The logical batch's physical batches are dealt round-robin: batch j goes to rank ``j mod W``. Every rank
     still draws the augmentations of all of them from the step's generator, so each sample gets the views a
     single process would give it.
  3. Each rank clips each of its samples' gradients to C and sums them; one all-reduce (SUM) gives the sum of the
     clipped gradients over the whole logical batch: each sample is counted exactly once, by the rank that
     holds it.
  4. The noise N(0, sigma^2 C^2) is added *once*, after the all-reduce: every rank draws the same vector from the
     step's seeded noise generator, so all ranks hold the same noisy gradient and take the same optimizer step
     (no DDP gradient averaging is involved). This is the mechanism of opacus' ``DistributedDPOptimizer``
     (clip per rank, noise once, all-reduce), with the noise drawn from the shared per-step generator instead of
     on rank 0 alone, so that the models never need to be synchronised.
Rank 0 alone writes checkpoints (one ledger) and evaluates. Sampling, augmentation and noise equal a single
process's, so a W-process run equals a one-process run with the same seed up to floating-point summation order
(tested); models with random gates (L0) draw their gates per physical batch from the step-seeded global RNG, so
for them the runs are equally private but not equal draw for draw.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
import secrets
from typing import Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0: the process that writes files and prints (outside a group, torchrun's ``RANK`` decides)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: str | None) -> bool:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1) if not already in one.

    Returns True when this call created the group (the caller then tears it down with :func:`teardown`).
    The backend is NCCL when training on CUDA, gloo otherwise.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def teardown(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str | None):
    """Inside, this process is in the torchrun-described process group if there is one (:func:`setup`); on leaving,
    a group this created is destroyed."""
    created = setup(device)
    try:
        yield
    finally:
        teardown(created)


def local_device(device: torch.device) -> torch.device:
    """On CUDA, each rank uses GPU ``LOCAL_RANK`` (``cuda`` and ``cuda:0`` alike); CPUs are shared."""
    if device.type == "cuda" and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _device() -> torch.device:
    """The device collectives run on: NCCL needs CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shared_seed(seed: int | None) -> int | None:
    """The same seed on every rank: a given seed is checked to be equal everywhere; ``None`` (a secret seed) is
    drawn from the OS on rank 0 and broadcast. Outside a process group, returns ``seed`` unchanged."""
    rank, size = world()
    if size == 1:
        return seed
    mine = torch.tensor([-1 if seed is None else int(seed)], dtype=torch.int64, device=_device())
    if seed is None and rank == 0:
        mine.fill_(secrets.randbits(62))
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if seed is not None and lo.item() != hi.item():
        raise ValueError(f"the ranks were given different seeds ({lo.item()} ... {hi.item()}); give them one seed")
    dist.broadcast(mine, src=0)
    return int(mine.item())


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of ``items``: item j goes to rank ``j mod W``. Every item is still produced (so that
    random draws made while producing them stay in step with a single process); only this rank's are yielded."""
    rank, size = world()
    for j, item in enumerate(items):
        if j % size == rank:
            yield item


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over the ranks, in place: one flattened all-reduce per dtype (float32 gradients are not
    widened by a float64 counter beside them); a no-op for a single process."""
    if world()[1] == 1 or not tensors:
        return tensors
    on = _device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        reduced = torch.cat([t.reshape(-1) for t in group]).to(on)
        dist.all_reduce(reduced)
        start = 0
        for t in group:
            t.copy_(reduced[start:start + t.numel()].view_as(t))
            start += t.numel()
    return tensors


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (the models start identical whatever each rank built)."""
    if world()[1] == 1:
        return
    on = _device()
    for t in [*module.parameters(), *module.buffers()]:
        buf = t.detach().to(on).clone()
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def broadcast_json(obj):
    """Rank 0's JSON-serialisable ``obj`` on every rank (e.g. the evaluation metrics); sent as JSON bytes, not
    pickled (torch.distributed's object collectives would unpickle it)."""
    if world()[1] == 1:
        return obj
    on = _device()
    data = json.dumps(obj).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=on)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=on)
    if is_main():
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
