"""Where a :func:`unet3d.train.train` run computes: its device, and its DDP process group.

:func:`resolve_device` (:func:`dwp.devices.resolve_device`, re-exported) checks a device name (``cpu``, ``cuda``, ``cuda:N``, ``mps`` where
torch has it) against this machine before any work, for ``TrainConfig.device`` and the
``--device`` options alike: a missing GPU is then one line naming the option, not a
traceback from the first forward pass.

:func:`process_group` places one process of a run: without torchrun it is rank 0 of 1 on
the configured device; under torchrun (``RANK`` / ``WORLD_SIZE`` set, world size > 1) it
joins a process group, ``nccl`` when the device is CUDA (each rank on
``cuda:<LOCAL_RANK>``, whatever index the config names: one GPU per process) and ``gloo``
otherwise.  :func:`mean_over_ranks` averages a number over the ranks on the device the
backend reduces on (NCCL reduces CUDA tensors only).

On the CPU nothing here changes a result: moving a CPU tensor to the CPU returns it as it
is, so a run with ``device="cpu"`` is bit for bit the run without a device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

# one check of a device argument for the whole library (dwp's), re-exported for unet3d
from dwp.devices import available_devices, resolve_device

__all__ = [
    "Placement",
    "available_devices",
    "backend",
    "batch_to",
    "device_rng_state",
    "distributed_env",
    "mean_over_ranks",
    "process_group",
    "rank_device",
    "reseed_device",
    "resolve_device",
    "restore_device_rng",
]


class Placement(NamedTuple):
    """Where one process of a run stands: its rank, the number of processes, its device."""

    rank: int
    world: int
    device: torch.device


def distributed_env() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment, ``(0, 1)`` without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return (rank, world) if world > 1 else (0, 1)


def backend(device: torch.device) -> str:
    """The process-group backend for ``device``: ``nccl`` for CUDA, ``gloo`` otherwise
    (NCCL is the fast one on GPUs but has no CPU tensors)."""
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the process ``local_rank`` of this node: ``cuda:<local_rank>`` when
    ``device`` is CUDA (one GPU per process, as torchrun launches them), ``device``
    itself otherwise."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


@contextmanager
def process_group(device: torch.device) -> Iterator[Placement]:
    """This process's :class:`Placement`, inside the process group of a DDP run.

    Under torchrun with world size > 1 it joins a process group of :func:`backend`
    (unless one is already initialised, which is then used and left open) and leaves it
    on exit; a CUDA ``device`` becomes ``cuda:<LOCAL_RANK>``.  Without torchrun it yields
    ``Placement(0, 1, device)`` and touches nothing.

    Raises
    ------
    ValueError
        A CUDA rank whose ``cuda:<LOCAL_RANK>`` this machine does not have.
    """
    rank, world = distributed_env()
    if world == 1:
        yield Placement(rank, world, device)
        return
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(rank_device(device, local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and barriers use this device
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend(device))
    try:
        yield Placement(*distributed_env(), device)
    finally:
        if own_group:
            dist.destroy_process_group()


def batch_to(batch: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """A batch's ``image`` and ``label`` on ``device`` (non-blocking from pinned memory;
    a CPU tensor stays the very same tensor on the CPU)."""
    return (
        batch["image"].to(device, non_blocking=True),
        batch["label"].to(device, non_blocking=True),
    )


def mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    """The mean of ``value`` over the ``world`` ranks of the process group (``value``
    itself for one process), reduced in float64 so that every rank sees the very same
    number: on ``device`` when it is CUDA (NCCL reduces CUDA tensors only), on the CPU
    otherwise (gloo's tensors)."""
    if world == 1:
        return value
    where = device if device.type == "cuda" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.float64, device=where)
    dist.all_reduce(total)
    return float(total) / world


def device_rng_state(device: torch.device) -> dict[str, Any] | None:
    """``device``'s random generator state, for ``last.pt`` (``None`` on the CPU, whose
    generator ``torch_rng`` holds): ``{"device": "cuda", "state": <uint8 tensor>}``."""
    if device.type == "cuda":
        return {"device": "cuda", "state": torch.cuda.get_rng_state(device)}
    if device.type == "mps":
        return {"device": "mps", "state": torch.mps.get_rng_state()}
    return None


def restore_device_rng(
    device: torch.device, saved: Mapping[str, Any] | None, seed: int, step: int
) -> None:
    """Continue ``device``'s weight-noise stream where ``last.pt`` left it.

    ``saved`` is :func:`device_rng_state` of the interrupted run.  A run resumed on the
    same kind of accelerator then draws the noise the uninterrupted run would have drawn,
    bit for bit as on the CPU.  A file without it (written before it was kept, or by a run
    on another kind of device) reseeds the generator from ``(seed, step)``
    (:func:`reseed_device`): the resumed run then goes on with new noise, never with the
    noise of its first steps again.
    """
    if saved is not None and saved.get("device") == device.type:
        if device.type == "cuda":
            torch.cuda.set_rng_state(saved["state"], device)
            return
        if device.type == "mps":
            torch.mps.set_rng_state(saved["state"])
            return
    reseed_device(device, seed, step)


def reseed_device(device: torch.device, seed: int, step: int) -> None:
    """Seed ``device``'s random generator from ``(seed, step)`` (nothing on the CPU): what
    a resumed run does when ``last.pt`` holds no state of this device's generator (see
    :func:`restore_device_rng`)."""
    value = (seed * 1_000_003 + step + 1) % 2**63
    if device.type == "cuda":
        torch.cuda.manual_seed_all(value)
    elif device.type == "mps":
        torch.mps.manual_seed(value)
