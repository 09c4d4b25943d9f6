"""The numeric setting a model stage ran under, written into its metrics.

The first-minibatch ratio compares two passes made in two processes (the rollout's log-prob pass and the update's
first forward); they agree bit for bit only when both ran with the same dtype, attention kernel, CPU kernels and
thread count. Each stage records those, so a ratio that is not exactly 1 can be traced to the setting that differed.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "numerics/"
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")


def resolve_threads(setting: int) -> int:
    """`runtime.threads` as the count every model stage sets: the setting itself, or for 0 OMP_NUM_THREADS when set,
    else one thread per physical core this process may run on (torch's own default counts cores too). That default is
    fixed when torch is imported, which for a stage served warm happened in the warm process, under that process's
    CPUs and not the command's; resolved here, after a warm worker has taken its command's CPUs, a stage gets the same
    count served warm or run directly."""
    if setting > 0:
        return setting
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:  # hyperthreads of one core share (package, core id)
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple((topology / name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:
            return len(cpus)
    return len(cores)


def set_threads(setting: int) -> int:
    """torch's thread count set explicitly (also when `runtime.threads` is 0): an explicit count also turns off
    MKL's dynamic choice of threads per call. Returns the count."""
    import torch

    threads = resolve_threads(setting)
    torch.set_num_threads(threads)
    return threads


def setting(device, attention: str) -> dict:
    """`numerics/*` metrics of this process: served by the warm process or run directly, torch threads, the base's
    dtype, the attention kernel (`policy_model.attention` resolved), torch's CPU kernel level and the ISA caps set in
    the environment."""
    import torch

    from rlhf.runtime.warm_start import WORKER_ENV

    out = {
        f"{PREFIX}process": "warm" if os.environ.get(WORKER_ENV) else "direct",
        f"{PREFIX}threads": torch.get_num_threads(),
        f"{PREFIX}dtype": device.dtype,
        f"{PREFIX}attention": device.attention(attention),
        f"{PREFIX}cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    out.update({f"{PREFIX}{name.lower()}": os.environ[name] for name in ISA_ENV if os.environ.get(name)})
    return out
