"""Data parallelism over torch.distributed, launched with `torchrun` (gloo on CPU, NCCL on GPUs).

Work is split in units that are the same whatever the world size — generation chunks (each seeded by its index) and
the rollout's fixed micro-batches — so a sharded run computes exactly what one process computes, and rank 0 merges
the results in the single-process order. In the update, each rank back-propagates its share of a minibatch's
micro-batches (losses normalised by the whole minibatch's token count) and gradients are summed with all-reduce:
the step equals the single-process step up to float summation order.

Several nodes are one process group too (torchrun's c10d rendezvous, docs/cluster.md): ranks are global, a rank's GPU
is its local rank, rank 0 alone writes. A collective that fails or waits past runtime.peer_timeout (a peer died or
hangs) raises PeerError — one line naming the process group's address — instead of a traceback or a wait of torch's
default half hour.
"""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

from rlhf.errors import PeerError
from rlhf.runtime.device import Device
from rlhf.runtime.launch import RENDEZVOUS_ENV, REPORTED_ENV

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
        collective(lambda: torch.distributed.all_gather_object(parts, local))
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
            collective(lambda: torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM))
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
        collective(lambda: torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM))
        collective(lambda: torch.distributed.all_reduce(biggest, op=torch.distributed.ReduceOp.MAX))
        summed, biggest = summed.tolist(), biggest.tolist()
        return {k: biggest[i] if k in maxima else summed[i] for i, k in enumerate(keys)}

    def barrier(self) -> None:
        if self.active:
            collective(torch.distributed.barrier)


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


def init_distributed(device: Device, timeout_s: int | None = None) -> Dist:
    """Join the process group torchrun set up (WORLD_SIZE > 1) with the device's backend (NCCL for CUDA, gloo
    otherwise), or run alone. timeout_s (runtime.peer_timeout) bounds the wait for the other ranks, here and in every
    collective; None: torch's default."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(where=device.where)
    if not torch.distributed.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        collective(lambda: torch.distributed.init_process_group(backend=device.backend, timeout=timeout),
                   "joining the process group")
        leave_group_at_exit()
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), device.where)


def collective(fn: Callable[[], object], doing: str = "in a collective") -> object:
    """fn() (a collective); its failure — a peer's connection closed, a wait past the timeout — becomes PeerError.
    Only failures of collectives land here, so a bug in the model code still shows its traceback."""
    try:
        return fn()
    except RuntimeError as err:  # gloo raises plain RuntimeError, the store and NCCL torch.distributed.DistError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if os.environ.get(REPORTED_ENV):  # `rlhf torchrun` then adds no line of its own
            Path(os.environ[REPORTED_ENV]).touch()
        raise PeerError(f"rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} lost the other "
                        f"ranks {doing}, {group_address()}: {first[:300]}") from None


def group_address() -> str:
    """Where the ranks met: the rendezvous endpoint under `rlhf torchrun` (rlhf/runtime/launch.py), else the store
    address and rendezvous id plain torchrun tells its workers."""
    if os.environ.get(RENDEZVOUS_ENV):
        return os.environ[RENDEZVOUS_ENV]
    where = f"process group at {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    job = os.environ.get("TORCHELASTIC_RUN_ID")
    return f"{where}, rendezvous id {job}" if job else where


def leave_group_at_exit() -> None:
    """Destroy the process group before the interpreter ends. Left to process teardown, gloo's worker threads are
    destroyed while still joinable: a rank that finishes first dies by SIGABRT ("terminate called without an active
    exception"), about one exit in five on a 2-core machine, and torchrun reports the stage as failed."""
    def leave() -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    atexit.register(leave)
