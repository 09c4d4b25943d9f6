"""The one device decision: where tensors live, which numeric context forward passes run in, which random generators,
attention kernel and collective backend go with that. Every stage resolves a `Device` once from `runtime.device` and
passes it on explicitly; nothing else in the package names a device or an autocast device type.

`auto` takes CUDA when torch sees it (under torchrun each rank takes cuda:LOCAL_RANK), else the CPU. `meta` is for
the test suite: tensors there have shapes and dtypes but no values, and PyTorch refuses to mix most of them with CPU
tensors, so a tensor created on the wrong device in a model pass surfaces on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

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
    """`auto`: bf16 where the hardware computes it faster than fp32, else fp32 (explain_dtype says why)."""
    return explain_dtype(setting, where)[0]


def explain_dtype(setting: str, where: torch.device) -> tuple[str, str]:
    """The base models' dtype and why: a set dtype is taken as it is; `auto` on CUDA is bf16 where the GPU supports
    it, on the CPU what cpu_dtype() decided once for this machine."""
    if setting != "auto":
        return setting, "set in params.yaml"
    if where.type == CUDA:
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU computes bf16"
        return "float32", "auto: the GPU has no bf16"
    if where.type == CPU:
        choice = cpu_dtype()
        return choice["dtype"], "auto: " + choice["why"]
    return "float32", "auto: no bf16 on meta"


# CPU flags (/proc/cpuinfo) of the instructions that make oneDNN's bf16 matmul native. Without them oneDNN still
# reports bf16 support on any AVX-512 CPU, but emulates it, slower than fp32 (measured: 49.7 vs 284 GFLOP/s on one
# such machine; 93 vs 122 on an AVX512-BF16 CPU with oneDNN capped at AVX512_CORE), while with them bf16 runs 2–5×
# faster than fp32.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CACHE_ENV = "RLHF_DTYPE_CACHE"  # the file cpu_dtype() keeps its decisions in (default: the user's cache folder)


def cpu_dtype() -> dict:
    """`auto` on this CPU: {"dtype", "why", ...}, decided once per machine and kept in a small JSON file.

    Every stage resolves the dtype afresh, and all of one run's stages must get the same answer (the update's
    ratio compares log-probs the rollout computed in that dtype). The CPU's flags decide where they can; only a CPU
    whose flags promise native bf16 (or whose flags are unknown) measures both matmul rates, once, and that decision
    is stored keyed by CPU model, flags, torch version and oneDNN's ISA cap, so later stages read it instead of
    measuring again: a noisy second measurement cannot flip the dtype mid-run. A lock makes concurrent first stages
    measure once. Where the file cannot be written, the flags alone decide, the same way in every stage."""
    kernels = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = cpu_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    native = bf16_isa(flags, cap)
    if not kernels or native is False:
        return decide_cpu_dtype(kernels, native, None, cap if native is False and bf16_isa(flags, "") else "")
    key = machine_key(flags)
    path = dtype_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Rewritten in place under the lock (a replaced file would leave a waiting process locking the old one).
        with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                cache = json.loads(handle.read() or "{}")
            except ValueError:
                cache = {}  # a damaged file: decide again
            if key in cache:
                return cache[key]
            choice = decide_cpu_dtype(kernels, native, measure_bf16_fp32())
            cache[key] = {**choice, "cpu": cpu_model(), "torch": torch.__version__}
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(cache, indent=1) + "\n")
    except OSError as err:
        fallback = decide_cpu_dtype(kernels, native, None)
        return {**fallback, "why": f"{fallback['why']} (no measurement: cannot write {path}: {err.strerror})"}
    from rlhf.runtime.log import log

    log(f"dtype auto on this CPU: {choice['dtype']} ({choice['why']}); kept in {path}")
    return cache[key]


def decide_cpu_dtype(kernels: bool, native: bool | None, rates: tuple[float, float] | None, cap: str = "") -> dict:
    """The rule, apart from its inputs: oneDNN's bf16 kernels exist (kernels), the CPU's flags promise native bf16
    (native: None where unknown), the measured (fp32, bf16) matmul GFLOP/s (None where not measured) and the
    ONEDNN_MAX_CPU_ISA that keeps oneDNN from the bf16 instructions the CPU has (cap)."""
    if not kernels:
        return {"dtype": "float32", "why": "oneDNN has no bf16 kernels on this CPU"}
    if native is False and cap:
        return {"dtype": "float32", "why": f"ONEDNN_MAX_CPU_ISA={cap} keeps oneDNN from AVX512-BF16/AMX: it would "
                                          "emulate bf16, slower than fp32"}
    if native is False:
        return {"dtype": "float32", "why": "no AVX512-BF16 or AMX: oneDNN would emulate bf16, slower than fp32"}
    if rates is None:
        if native:
            return {"dtype": "bfloat16", "why": "AVX512-BF16/AMX (flags)"}
        return {"dtype": "float32", "why": "bf16 speed unknown on this CPU"}
    fp32, bf16 = rates
    found = "AVX512-BF16/AMX" if native else "bf16 instructions unknown"
    rounded = {"fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1)}
    if bf16 > fp32:
        return {"dtype": "bfloat16", "why": f"{found}, bf16 matmul {bf16 / fp32:.1f}× fp32 measured", **rounded}
    return {"dtype": "float32", "why": f"{found}, but bf16 matmul {bf16:.0f} < fp32 {fp32:.0f} GFLOP/s measured",
            **rounded}


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "CPU part"):
            return value.strip()
    return platform.machine()


def bf16_isa(flags: frozenset[str] | None, isa_cap: str) -> bool | None:
    """Whether oneDNN runs bf16 natively here: an x86 CPU with AVX512-BF16 or AMX-BF16, unless ONEDNN_MAX_CPU_ISA
    caps oneDNN below them (then it emulates bf16, as on a CPU without them). None off x86 or without flags."""
    if flags is None or "sse2" not in flags:  # not an x86 CPU (Arm's bf16 is left to the measurement)
        return None
    cap = isa_cap.upper()
    if cap and cap not in ("ALL", "DEFAULT") and not any(part in cap for part in ("BF16", "AMX", "FP16", "AVX10")):
        return False
    return any(flag in flags for flag in BF16_FLAGS)


def machine_key(flags: frozenset[str] | None) -> str:
    parts = [cpu_model(), platform.machine(), " ".join(sorted(flags or ())), torch.__version__,
             os.environ.get("ONEDNN_MAX_CPU_ISA", "")]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def dtype_cache_path() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rlhf-dvc" / "cpu-dtype.json"


def measure_bf16_fp32(size: int = 512, rounds: int = 16) -> tuple[float, float]:
    """(fp32, bf16) matmul GFLOP/s on one thread, each the best of `rounds` single products taken in turn: the best
    time is what the CPU can do, where a mean would also count whatever else ran meanwhile, and one thread has no
    straggler to wait for on a busy machine; the ratio is what decides (about 0.3 s in all)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mats = {dt: (torch.randn(size, size, dtype=dt), torch.randn(size, size, dtype=dt))
                for dt in (torch.float32, torch.bfloat16)}
        for a, b in mats.values():
            a @ b  # warm-up: oneDNN builds its kernel on first use
        best: dict = {}
        for _ in range(rounds):
            for dt, (a, b) in mats.items():
                start = time.perf_counter()
                a @ b
                best[dt] = min(best.get(dt, float("inf")), time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    flops = 2 * size**3 / 1e9
    return flops / best[torch.float32], flops / best[torch.bfloat16]


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


def machine_line(dtype: str = "auto", device: str = "auto") -> str:
    """One line that says how fast this CPU is and which dtype the base models run in (and why), for logs and
    benchmark output; dtype and device are the params' policy_model.dtype and runtime.device."""
    where = torch.device(CUDA if device in ("auto", CUDA) and torch.cuda.is_available() else CPU)
    chosen, why = explain_dtype(dtype, where)
    return (f"machine: {os.cpu_count()} CPUs, matmul {matmul_gflops(torch.float32):.0f} GFLOP/s fp32, "
            f"{matmul_gflops(torch.bfloat16):.1f} GFLOP/s bf16 (1024×1024 by 1024×1024, {torch.get_num_threads()} "
            f"threads); dtype {chosen} ({why})")
