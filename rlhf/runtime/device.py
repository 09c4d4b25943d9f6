"""The one device decision: where tensors live, which numeric context forward passes run in, which random generators,
attention kernel and collective backend go with that. Every stage resolves a `Device` once from `runtime.device` and
passes it on explicitly; nothing else in the package names a device or an autocast device type.

`auto` takes CUDA when torch sees it (under torchrun each rank takes cuda:LOCAL_RANK), else the CPU. `meta` is for
the test suite: tensors there have shapes and dtypes but no values, and PyTorch refuses to mix most of them with CPU
tensors, so a tensor created on the wrong device in a model pass surfaces on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass

import torch

from rlhf.config.params import ParamsError

CPU, CUDA, META = "cpu", "cuda", "meta"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The one SDPA kernel every forward pass on CUDA runs with (Device.compute). The rollout's no-grad log-prob pass and
# the update's grad pass must compute attention alike for the first minibatch's ratio to be exactly 1; left to choose,
# torch may take cuDNN attention, whose plan can differ between the two. Memory-efficient attention takes every input
# the passes give it: no mask (causal scoring passes), a boolean decode mask, bf16 or fp32, with or without grad.
SDPA_BACKEND = "efficient"
SDPA_BACKENDS = {"efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "math": "MATH",
                 "cudnn": "CUDNN_ATTENTION"}
# What this process resolved: the attention implementations its models loaded with, the SDPA kernel its passes were
# held to. bench/gpu_check.py reads it when a stage's process ends.
USED: dict[str, set[str]] = {"attention": set(), "sdpa_backend": set()}


@dataclass(frozen=True)
class Device:
    """Placement and numerics of one stage's models. `autocast_dtype` is set for a bf16 base: trainable weights stay
    fp32 (master weights) and every forward runs under autocast, so matmuls run in bf16."""

    where: torch.device
    autocast_dtype: torch.dtype | None
    dtype: str = "float32"  # the base models' dtype, `auto` resolved (resolve_dtype)

    @property
    def type(self) -> str:
        return self.where.type

    @property
    def is_cuda(self) -> bool:
        return self.type == CUDA

    def compute(self) -> contextlib.AbstractContextManager:
        """The numeric context of every forward pass: autocast for a bf16 base, and on CUDA the one SDPA kernel
        (SDPA_BACKEND). Meta has no autocast; its tensors carry no values anyway."""
        return self._compute()

    @contextlib.contextmanager
    def _compute(self):
        with contextlib.ExitStack() as stack:
            if self.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                stack.enter_context(sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[SDPA_BACKEND])))
                USED["sdpa_backend"].add(SDPA_BACKEND)
            if self.autocast_dtype is not None and self.type != META:
                stack.enter_context(torch.autocast(device_type=self.type, dtype=self.autocast_dtype))
            yield

    def generator(self, seed: int) -> torch.Generator | None:
        """A seeded generator on the device (None on meta, which has no generators: draws there are shapes only)."""
        if self.type == META:
            return None
        return torch.Generator(device=self.where).manual_seed(seed)

    def attention(self, setting: str) -> str:
        """`auto`: our chunked causal kernel on the CPU (and on meta, to check its placement), fused SDPA on CUDA."""
        chosen = setting if setting != "auto" else "sdpa" if self.is_cuda else "chunked"
        USED["attention"].add(chosen)
        return chosen

    @property
    def weight_major_decode(self) -> bool:
        """Decode-step projections as W·xᵀ (sampling.weight_major_linears): faster for oneDNN's fp32 small-row
        GEMMs on the CPU (measured: 0.34 → 0.19 ms for a 576² projection at 32 rows, 38 → 24 ms for SmolLM2's
        LM head); cuBLAS and bf16 kernels are left as they are."""
        return self.type == CPU and self.autocast_dtype is None and self.dtype == "float32"

    @property
    def backend(self) -> str:
        return "nccl" if self.is_cuda else "gloo"

    @property
    def load_kwargs(self) -> dict:
        """from_pretrained arguments that put the weights straight on a GPU (no host copy first: the reward model
        is ~15 GB in bf16)."""
        return {"device_map": self.where} if self.is_cuda else {}

    @property
    def fused_optimizer(self) -> bool:
        return self.type in (CPU, CUDA)  # meta has no fused AdamW kernel

    def free(self) -> None:
        """Give back what a model stage held: the caller drops its references first."""
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def reset_peak(self) -> None:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.where)

    def peak_bytes(self) -> int:
        return int(torch.cuda.max_memory_allocated(self.where)) if self.is_cuda else 0


def resolve_dtype(setting: str, where: torch.device) -> str:
    """`auto`: bf16 where the hardware computes it natively, else fp32. On a CPU without AVX-512 oneDNN has no bf16
    kernels and a bf16 matmul falls back to a path two orders of magnitude slower than fp32; with AVX512-BF16/AMX bf16 is several times faster than fp32. `matmul_gflops` measures both."""
    if setting != "auto":
        return setting
    if where.type == CUDA:
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if where.type == CPU:
        return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"
    return "float32"


def resolve_device(setting: str, dtype: str) -> Device:
    """`runtime.device` (auto | cpu | cuda | meta) and a model dtype → the stage's Device; under torchrun with CUDA
    this rank's GPU (LOCAL_RANK) becomes the current one, which NCCL needs."""
    if setting == "auto":
        setting = CUDA if torch.cuda.is_available() else CPU
    if setting == CUDA and not torch.cuda.is_available():
        raise ParamsError("runtime.device: cuda, but torch sees no CUDA device (use auto or cpu)")
    if setting == CUDA:
        where = torch.device(CUDA, cuda_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
        torch.cuda.set_device(where)
    else:
        where = torch.device(setting)
    dtype = resolve_dtype(dtype, where)
    return Device(where, torch.bfloat16 if dtype == "bfloat16" else None, dtype)


def cuda_index(local_rank: int, count: int) -> int:
    """This rank's GPU: one per process on the node (NCCL refuses two ranks on one GPU)."""
    if local_rank >= count:
        raise ParamsError(f"runtime.device: cuda, but this is local rank {local_rank} and torch sees {count} "
                          f"GPU{'s' if count != 1 else ''}: start at most {count} process{'es' if count != 1 else ''} "
                          "per node (torchrun --nproc-per-node)")
    return local_rank


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast disabled on t's device (a kernel that picks its own precision); meta has no autocast to disable."""
    if t.device.type == META:
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def matmul_gflops(dtype: torch.dtype, size: int = 1024, budget_s: float = 0.5) -> float:
    """This machine's CPU matmul throughput in `dtype` (size × size by size × size, repeated for about budget_s),
    printed next to every published time: machines of the same kind differ by 2× and more."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up (oneDNN primitive creation)
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < budget_s:
        a @ b
        reps += 1
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e9


def read_bandwidth_gbs(megabytes: int = 512, budget_s: float = 0.5) -> float:
    """This machine's memory read bandwidth in GB/s (summing a buffer far larger than the caches): the rate at which
    a decoding step can stream weights, its limit when it multiplies few rows."""
    x = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    x.sum()  # warm-up: pages touched, threads started
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < budget_s:
        x.sum()
        reps += 1
    return x.numel() * 4 * reps / (time.perf_counter() - start) / 1e9


def machine_line() -> str:
    """One line that says how fast this CPU is, for logs and benchmark output."""
    return (f"machine: {os.cpu_count()} CPUs, matmul {matmul_gflops(torch.float32):.0f} GFLOP/s fp32, "
            f"{matmul_gflops(torch.bfloat16):.1f} GFLOP/s bf16 (1024×1024 by 1024×1024, {torch.get_num_threads()} threads)")
