"""Data parallelism over torch.distributed, launched with `torchrun` (gloo on CPU, NCCL on GPUs).

Work is split in units that are the same whatever the world size — generation chunks (each seeded by its index) and
the rollout's fixed micro-batches — so a sharded run computes exactly what one process computes, and rank 0 merges
the results in the single-process order. In the update, each rank back-propagates its share of a minibatch's
micro-batches (losses normalised by the whole minibatch's token count) and gradients are summed with all-reduce:
the step equals the single-process step up to float summation order.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Iterable, TypeVar

import torch

from rlhf.runtime.device import Device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    where: torch.device | None = None  # the collectives' device (NCCL: this rank's GPU); None: torch's default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def mine(self, units: Iterable[T]) -> list[T]:
        """This rank's units: round-robin over the unit index."""
        return [u for i, u in enumerate(units) if i % self.world == self.rank]

    def merge(self, local: dict) -> dict:
        """Union of every rank's {unit index: result} dicts, on every rank. Results are host values (lists, floats,
        CPU tensors): they are pickled through the process group (NCCL stages them via the current GPU)."""
        if not self.active:
            return dict(local)
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, local)
        merged: dict = {}
        for part in parts:
            merged.update(part)
        return merged

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Gradients summed over ranks in buckets of one dtype up to BUCKET_BYTES: one collective per bucket (a
        LoRA update's few hundred small tensors in one or two), not one per parameter."""
        if not self.active:
            return
        for bucket in buckets(list(parameters)):
            for p in bucket:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
            for p, summed in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(summed.view_as(p.grad))

    def sum_stats(self, stats: dict, maxima: tuple[str, ...] = ()) -> dict:
        """Sums (or, for `maxima`, maxima) over ranks of {name: float or 0-d tensor on the device}, as host floats:
        one stacked tensor on the collectives' device, one copy back."""
        keys = sorted(stats)
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=self.where).reshape(())
                              for k in keys])  # (K,)
        if not self.active:
            return dict(zip(keys, values.tolist()))
        summed, biggest = values.clone(), values.clone()
        torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(biggest, op=torch.distributed.ReduceOp.MAX)
        summed, biggest = summed.tolist(), biggest.tolist()
        return {k: biggest[i] if k in maxima else summed[i] for i, k in enumerate(keys)}

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


BUCKET_BYTES = 256 * 2**20


def buckets(parameters: list[torch.nn.Parameter], limit: int = BUCKET_BYTES) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters grouped by dtype and device, each group up to `limit` bytes (a larger tensor alone)."""
    groups: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in parameters:
        nbytes = p.numel() * p.element_size()
        last = groups[-1] if groups else None
        if last and (last[0].dtype, last[0].device) == (p.dtype, p.device) and size + nbytes <= limit:
            last.append(p)
            size += nbytes
        else:
            groups.append([p])
            size = nbytes
    return groups


def init_distributed(device: Device) -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1) with the device's backend (NCCL for CUDA, gloo
    otherwise), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(where=device.where)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=device.backend)
        leave_group_at_exit()
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), device.where)


def leave_group_at_exit() -> None:
    """Destroy the process group before the interpreter ends. Left to process teardown, gloo's worker threads are
    destroyed while still joinable: a rank that finishes first dies by SIGABRT ("terminate called without an active
    exception"), about one exit in five on a 2-core machine, and torchrun reports the stage as failed."""
    def leave() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    atexit.register(leave)
