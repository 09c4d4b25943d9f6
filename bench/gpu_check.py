"""The GPU check: the Qwen3 + Skywork pipeline on one GPU machine, in parts ordered by value, each under its own
deadline, every number written to gpu.json under --out the moment it exists. Run it through bench/gpu_run.sh (which
installs the carried wheels first); `--device cpu --tiny` is its CPU rehearsal (tests/test_gpu_check.py).

    bash bench/gpu_run.sh                        # on the GPU machine: everything below, under 570 s
    bash bench/gpu_run.sh --device cpu --tiny    # the same script on a CPU with tiny shapes

First a preflight, before anything heavy: every module the parts import, importable (else one line naming the
carried wheels); the library versions and the device (torch, CUDA, cuDNN, driver, transformers, peft, accelerate);
free disk; the GPU's memory free; whether TRL's part fits the GPU by the memory model. Then the clock starts.

Parts (`--parts`, default all, in this order):
  a  quick check: random-weight Qwen3-0.6B + Skywork-Reward-V2-Qwen3-8B architectures built on the device in bf16,
     the base-model, prepare and init steps, then one PPO iteration of 8 prompts × 1 epoch through the real stage
     scripts.
  b  the full iteration: 256 prompts × 53 new tokens, 4 epochs × 2 minibatches, LoRA r=32 on the 7 projections, then
     the evaluate stage; samples/s and tokens/s of the iteration from the stages' compute time (process start and
     model loading apart); then a decode benchmark (a warm-up pass, then a timed pass) split into prefill and decode.
  w  the warm start: part a's rollout again through a fork of a process that imported torch; its artifact must
     equal the direct run's byte for byte.
  c  TRL 1.12's PPOTrainer (bench/trl_ppo_anchor.py) on the same models, prompts and PPO settings at part b's shape,
     side by side; skipped with one line when the memory model puts it above TRL_LIMIT_GIB.
  d  the data-parallel stages on 2 torchrun ranks against the 1-process run (only with 2 GPUs or more).

Each stage is its own process, as `dvc repro` runs it; its memory is read when it exits: the allocator's peak
allocated and reserved bytes and the whole device's used bytes (the CUDA context and other processes included).
Out: gpu.json (the results so far), gpu-run.log (one line per stage and part) and stages.log (the stages' output).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

T0 = time.monotonic()  # the check's clock: the preflight, the parts, the cleanup and the table all count
ROOT = Path(__file__).resolve().parent.parent
STAGES = ["sample", "rollout", "reward", "reference", "advantages", "update"]
MODEL_STAGES = {"rollout", "reward", "reference", "update", "evaluate"}
PARALLEL = ["rollout", "reward", "reference", "update"]  # the stages dvc.yaml runs through runtime.launcher
ARTIFACTS = {"rollout": "rollout.parquet", "reward": "scores.parquet", "reference": "reference.parquet"}
# What the GPU image lacks, as bench/gpu_wheels.sh downloads it (exact versions: the cp311 rehearsal and the cp312
# GPU run install the same ones). pydantic for the params; TRL and what it imports for part c; rouge-score and nltk
# for the evaluation's ROUGE.
WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "trl==1.12.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "nltk==3.10.4"]
SDIST_WHEELS = ["rouge-score==0.1.2"]  # published as a source archive only: built into a pure-Python wheel
# What the GPU image holds where this project's own venv differs (`bash bench/gpu_wheels.sh image`, never carried):
# the CPU rehearsal's venv installs these instead of its own, so the stages are rehearsed on the image's versions.
IMAGE_WHEELS = ["transformers==5.17.0", "huggingface-hub==1.33.0", "httpx==0.29.0", "httpcore==1.0.9"]
# What each part imports, in its stage processes (the preflight imports all of it in one child process).
IMPORTS = {
    "a": ["yaml", "pandas", "pyarrow", "safetensors", "tokenizers", "torch", "transformers", "peft", "pydantic",
          "rlhf.config.params", "rlhf.cli", "rlhf.data.prompts", "rlhf.models.architectures", "rlhf.models.checkpoint",
          "rlhf.models.scorers", "rlhf.models.sampling", "rlhf.models.passes", "rlhf.training.ppo_update",
          "rlhf.runtime.stage", "rlhf.runtime.warm_start", "rlhf.evaluation", "rouge_score.rouge_scorer", "nltk"],
    "c": ["accelerate", "datasets", "dill", "multiprocess", "trl", "trl.experimental.ppo"],
    "d": ["torch.distributed.run"],
}
IMPORTS["b"] = IMPORTS["w"] = IMPORTS["a"]
VERSIONS = ["torch", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "tokenizers", "trl",
            "datasets", "pydantic", "pandas", "pyarrow", "numpy"]
PARTS = {"a": 200, "b": 200, "w": 40, "c": 110, "d": 120}  # default deadlines, seconds
ORDER = "abwcd"
# The whole check (--total) stays under TOTAL seconds, its preflight and cleanup included: the parts end CLEANUP
# seconds before it (each part's deadline is cut to what is left, and a part with less than MIN_PART seconds left is
# not started), which leaves deleting ~16.5 GB of model files and the table their time. 570 s leaves a 10-minute
# command half a minute for installing the wheels and starting Python.
TOTAL = 570
CLEANUP = 20
MIN_PART = 20
PROMPTS = {"a": 8, "b": 256}  # part b at the anchors' scale (verl's one-GPU PPO quickstart: 256 samples per step)
TINY_PROMPTS_B = 64  # the CPU rehearsal's part b: the same code paths at a quarter of the rows
TRL_LIMIT_GIB = 70  # TRL's part runs only where the memory model puts its process at most this high (×RESERVE)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
GIB = 1024**3
GB = 1e9
# Free disk each run needs: the built models and their copies under models/base (bf16: 1.2 + 16.4 GB, twice), the
# states and artifacts on top.
DISK_GB = {"full": 36.0, "tiny": 2.0}
# Device memory in use before the check starts, the preflight's own CUDA context included (about 0.5 GiB), above
# which the preflight stops: another process holds the GPU.
GPU_BUSY_GIB = 3.0
# Runs a stage script in this process and records its wall time and device memory when it exits (run_stage ends
# with sys.exit, so the record is written in `finally`). One file per torchrun rank. For a model stage the model code
# is imported first (timed: part of the process start) and the model loaders are timed, so that the stage's compute
# time is its run minus loading; rlhf.runtime.device says which attention and SDPA kernel the stage's passes used.
PROBE = """import json, os, runpy, sys, time
started_at = time.time()
out, script, models = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
sys.argv = sys.argv[2:3] + sys.argv[4:]
record = {"started_at": started_at, "import_s": 0.0, "load_s": 0.0, "gpu": None}
if models:
    t = time.perf_counter()
    import rlhf.models.checkpoint as checkpoint, rlhf.models.scorers as scorers
    record["import_s"] = time.perf_counter() - t

    def timed(module, name):
        original = getattr(module, name)

        def load(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record["load_s"] += time.perf_counter() - t
        setattr(module, name, load)
    timed(checkpoint, "load_actors")
    timed(scorers, "load_scorer")
start = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    torch = sys.modules.get("torch")  # a torch-free stage's wall time must not include importing it here
    record["s"] = time.perf_counter() - start
    device = sys.modules.get("rlhf.runtime.device")
    if device is not None and hasattr(device, "USED"):
        record["attention"] = sorted(device.USED["attention"])
        record["sdpa_backend"] = sorted(device.USED["sdpa_backend"])
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        record.update(gpu=torch.cuda.get_device_name(), peak_allocated=torch.cuda.max_memory_allocated(),
                      peak_reserved=torch.cuda.max_memory_reserved(), device_used=total - free,
                      context=total - free - torch.cuda.memory_reserved())
    with open(out.format(rank=os.environ.get("RANK", "0")), "w") as f:
        json.dump(record, f)
"""


class Stop(Exception):
    """The preflight found the machine or the environment unfit: one line, exit 2, before anything heavy ran."""


class Deadline(Exception):
    pass


class Run:
    """The output folder: the result so far (gpu.json), the progress log and the stages' output, each flushed."""

    def __init__(self, out: Path, args):
        self.out, self.args = out, args
        out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(out / "gpu-run.log", "a", buffering=1)
        self.stage_log = open(out / "stages.log", "ab", buffering=0)
        self.result: dict = {"device": args.device, "tiny": args.tiny, "parts": {}}
        self.deadline = float("inf")
        self.child: subprocess.Popen | None = None

    def stop_with_signals(self) -> None:
        """A check stopped from outside (the device's time limit, Ctrl-C) takes the stage it runs down with it: the
        stage has a session of its own, so no signal to the check reaches it otherwise."""
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, self._stopped)

    def _stopped(self, signum, frame) -> None:
        if self.child is not None and self.child.poll() is None:
            os.killpg(self.child.pid, signal.SIGKILL)
        self.say(f"stopped by signal {signum}")
        raise SystemExit(128 + signum)  # main's cleanup still runs; the parts saved so far stay in gpu.json

    def say(self, line: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def save(self) -> None:
        tmp = self.out / "gpu.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2))
        os.replace(tmp, self.out / "gpu.json")

    def sh(self, cmd: list[str], cwd: Path, extra_env: dict | None = None) -> None:
        """A command in its own process group, killed with its children when the part's deadline passes."""
        name = next((Path(str(c)).name for c in reversed(cmd) if str(c).endswith(".py")), str(cmd[-1]))
        self.stage_log.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, stdout=self.stage_log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self.child = proc
        try:
            code = proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise Deadline(f"{name}: killed at the part's deadline") from None
        finally:
            self.child = None
        if code != 0:
            raise RuntimeError(f"{name} exited with {code} (output: stages.log)")


def die_with_parent() -> None:
    """In the stage's process, before it starts: the kernel kills it when the check dies, even by SIGKILL, which no
    handler sees (Linux; elsewhere only the signal handlers above stop it)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def env() -> dict:
    """The stages' environment: this checkout first, whatever PYTHONPATH held after it (the carried wheels)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def preset_params(proj: Path, args, quick: bool = True) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    sys.path.insert(0, str(ROOT))
    from rlhf.config.presets import PRESETS

    for section, values in PRESETS["qwen3-skywork"].items():
        p[section].update(values)
    p["data"].update({"source": "local", "split": "validation", "eval_size": 8})
    prompts = PROMPTS["a"] if quick else TINY_PROMPTS_B if args.tiny else PROMPTS["b"]
    minibatches = 2
    # the preset's generation chunk and micro-batch, at most what the batch and its minibatches hold
    chunk = min(p["rollout"]["generation_chunk"], prompts)
    micro = min(p["rollout"]["micro_batch_size"], prompts // minibatches)
    p["rollout"].update({"batch_size": prompts, "max_new_tokens": 53, "generation_chunk": chunk,
                         "micro_batch_size": micro})
    p["ppo"].update({"epochs": 1 if quick else 4, "num_minibatches": minibatches})
    # One BLAS thread per process on a CPU rehearsal, so 1 and N processes run the same kernels.
    threads = 1 if args.device == "cpu" else 0
    p["runtime"].update({"device": args.device, "warm_start": False, "progress": "off", "threads": threads})
    if args.tiny:
        p["data"]["max_prompt_tokens"] = 200
        p["data"]["overlong"] = "truncate"
    return p


def write_params(proj: Path, args, quick: bool) -> None:
    (proj / "params.yaml").write_text(yaml.safe_dump(preset_params(proj, args, quick), sort_keys=False))


def build_models(proj: Path, device: str, tiny: bool) -> None:
    """Random-weight Qwen3 + Skywork architectures, made on the device in bf16, where models.configs names them."""
    import torch

    from rlhf.models.architectures import build_policy, build_reward

    sizes = TINY if tiny else {}
    configs = ROOT / "models" / "configs"
    with torch.device(device):
        build_policy(configs, proj / "built/policy", torch_dtype="bfloat16", **sizes)
        build_reward(configs, proj / "built/reward", torch_dtype="bfloat16", **sizes)


def run_stage(run: Run, proj: Path, name: str, nproc: int = 1, extra_env: dict | None = None) -> dict:
    probe = proj / "probe.py"
    probe.write_text(PROBE)
    out = proj / f"probe-{name}-{{rank}}.json"
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    models = "1" if name in MODEL_STAGES else "0"
    launched_at, start = time.time(), time.perf_counter()
    run.sh([*launch, str(probe), str(out), str(ROOT / "stages" / f"{name}.py"), models], proj, extra_env)
    row = {"wall_s": time.perf_counter() - start}
    ranks = [json.loads(Path(str(out).format(rank=r)).read_text()) for r in range(nproc)]
    first = ranks[0]
    # process start: the interpreter (and torchrun) up to the probe, then importing the model code
    row["start_s"] = max(0.0, first["started_at"] - launched_at) + first["import_s"]
    row["load_s"] = first["load_s"]
    row["compute_s"] = first["s"] - first["load_s"]
    if "attention" in first:
        row["attention"] = first["attention"]
        row["sdpa_backend"] = first["sdpa_backend"] or None  # None: torch chose per call (nothing pinned it)
    if first["gpu"]:
        row["gpu"] = first["gpu"]
        for key in ("peak_allocated", "peak_reserved", "device_used", "context"):
            row[f"{key}_gib"] = max(r[key] for r in ranks) / GIB
    return row


def stage_line(label: str, name: str, s: dict) -> str:
    memory = (f"; peak {s['peak_allocated_gib']:.2f} GiB allocated, {s['peak_reserved_gib']:.2f} reserved, "
              f"{s['device_used_gib']:.2f} used on the device" if "gpu" in s else "")
    attention = f"; attention {'/'.join(s['attention'])}" if s.get("attention") else ""
    if s.get("sdpa_backend"):
        attention += f" (SDPA {'/'.join(s['sdpa_backend'])})"
    return (f"{label} {name}: {s['wall_s']:.1f} s (start {s['start_s']:.1f}, load {s['load_s']:.1f}, "
            f"compute {s['compute_s']:.1f}){memory}{attention}")


def iteration(run: Run, proj: Path, label: str, row: dict, nproc: int = 1) -> dict:
    """The six stages of one iteration; each stage's numbers go into row["stages"] and gpu.json as it ends."""
    shutil.rmtree(proj / "data" / "iteration", ignore_errors=True)
    shutil.rmtree(proj / "models" / "next", ignore_errors=True)
    stages = row.setdefault("stages", {})
    for name in STAGES:
        stages[name] = run_stage(run, proj, name, nproc if name in PARALLEL else 1)
        run.save()
        run.say(stage_line(label, name, stages[name]))
    return stages


def summary(proj: Path, stages: dict) -> dict:
    """The iteration's numbers from its artifacts and metrics: wall time (process starts and model loads included)
    and compute time, and the samples/s and tokens/s a per-step throughput compares with."""
    import pandas as pd

    rollout = json.loads((proj / "metrics/rollout.json").read_text())
    update = json.loads((proj / "metrics/update.json").read_text())
    frame = pd.read_parquet(proj / "data/iteration/rollout.parquet", columns=["prompt_ids", "response_length"])
    prompt_tokens = int(frame["prompt_ids"].map(len).sum())
    response_tokens = int(frame["response_length"].sum())
    compute = sum(s["compute_s"] for s in stages.values())
    row = {"samples": len(frame), "prompt_tokens": prompt_tokens, "response_tokens": response_tokens,
           "iteration_s": sum(s["wall_s"] for s in stages.values()), "compute_s": compute,
           "start_s": sum(s["start_s"] for s in stages.values()), "load_s": sum(s["load_s"] for s in stages.values()),
           "samples_per_s": len(frame) / compute, "tokens_per_s": (prompt_tokens + response_tokens) / compute,
           "response_tokens_per_s": response_tokens / compute,
           "rollout_generated_tokens_per_s": rollout["generated_tokens_per_s"],
           "generate_s": rollout["generate_seconds"], "steps": update["steps"],
           "first_minibatch_ratio_max_abs_dev": update["first_minibatch/ratio_max_abs_dev"]}
    if any("gpu" in s for s in stages.values()):
        row["peak_reserved_gib"] = max(s.get("peak_reserved_gib", 0.0) for s in stages.values())
        row["peak_allocated_gib"] = max(s.get("peak_allocated_gib", 0.0) for s in stages.values())
    return row


# ---- the parts -----------------------------------------------------------------------------------------------------
# Each part fills its row of gpu.json (run.result["parts"][key]) and saves it as each number comes: a part stopped at
# its deadline keeps what it had measured.


def part_a(run: Run, proj: Path, row: dict) -> None:
    args = run.args
    (proj / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "data" / "tldr", proj / "data" / "tldr", dirs_exist_ok=True)
    steps = row.setdefault("setup_s", {})
    start = time.perf_counter()
    run.sh([sys.executable, str(Path(__file__)), "build", str(proj), "--device", args.device,
            *(["--tiny"] if args.tiny else [])], proj)
    steps["build"] = time.perf_counter() - start
    run.save()
    run.say(f"a models built on {args.device}: {steps['build']:.1f} s")
    write_params(proj, args, quick=True)
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["policy_model"].update({"id": str(proj / "built/policy"), "revision": None})
    p["reward_model"].update({"id": str(proj / "built/reward"), "revision": None})
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for step in (["base_model.py", "policy"], ["base_model.py", "reward"], ["prepare.py"]):
        t = time.perf_counter()
        run.sh([sys.executable, str(ROOT / "stages" / step[0]), *step[1:]], proj)
        steps[" ".join(step)] = time.perf_counter() - t
        run.save()
        run.say(f"a {' '.join(step)}: {steps[' '.join(step)]:.1f} s")
    t = time.perf_counter()
    run.sh([sys.executable, "-m", "rlhf.cli", "init", "--no-baseline", "--no-track"], proj)
    steps["init"] = time.perf_counter() - t
    run.save()
    run.say(f"a init: {steps['init']:.1f} s")
    row.update(summary(proj, iteration(run, proj, "a", row)))
    # part w's warm rollout repeats this rollout: its inputs and the direct run's artifact, kept aside
    iteration_dir = proj / p["paths"]["iteration"]
    shutil.copytree(iteration_dir, proj / "a-iteration", dirs_exist_ok=True)
    shutil.copy(proj / "params.yaml", proj / "a-params.yaml")


def part_b(run: Run, proj: Path, row: dict) -> None:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    full = preset_params(proj, run.args, quick=False)
    for section in ("rollout", "ppo"):
        p[section] = full[section]
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    row["shape"] = shape(p)
    row.update(summary(proj, iteration(run, proj, "b", row)))
    run.save()
    run.say(f"b iteration: {row['samples']} samples, {row['prompt_tokens'] + row['response_tokens']} tokens in "
            f"{row['compute_s']:.1f} s of stage compute ({row['samples_per_s']:.2f} samples/s, "
            f"{row['tokens_per_s']:.0f} tokens/s); process starts {row['start_s']:.1f} s, model loads "
            f"{row['load_s']:.1f} s, wall {row['iteration_s']:.1f} s")
    row["evaluate"] = run_stage(run, proj, "evaluate")
    run.save()
    run.say(stage_line("b", "evaluate", row["evaluate"]))
    run.sh([sys.executable, str(Path(__file__)), "decode", str(proj)], proj)
    row["decode"] = json.loads((proj / "decode.json").read_text())
    run.save()
    d = row["decode"]
    run.say(f"b decode after a warm-up: {d['tokens_per_s']:.1f} tokens/s; prefill {d['prefill_tokens_per_s']:.0f} "
            f"prompt tokens/s ({d['prefill_s']:.2f} s), decode {d['decode_tokens_per_s']:.1f} tokens/s "
            f"({d['decode_s']:.2f} s)")


def shape(p: dict) -> dict:
    """The work of one iteration, as both sides of part c get it."""
    r, ppo = p["rollout"], p["ppo"]
    return {"prompts": r["batch_size"], "max_new_tokens": r["max_new_tokens"], "micro_batch": r["micro_batch_size"],
            "generation_chunk": r["generation_chunk"], "epochs": ppo["epochs"], "minibatches": ppo["num_minibatches"]}


def part_w(run: Run, proj: Path, row: dict) -> None:
    """Part a's rollout again, through the warm start, with part a's inputs put back for it (and the later parts'
    put back after it)."""
    if not (proj / "a-iteration").is_dir():
        raise RuntimeError("part a's rollout is not there to repeat (part a did not finish its iteration)")
    p = yaml.safe_load((proj / "params.yaml").read_text())
    iteration_dir = proj / p["paths"]["iteration"]
    aside = proj / "later-iteration"
    shutil.rmtree(aside, ignore_errors=True)
    if iteration_dir.exists():
        iteration_dir.rename(aside)
    shutil.copy(proj / "params.yaml", proj / "later-params.yaml")
    try:
        shutil.copytree(proj / "a-iteration", iteration_dir)
        shutil.copy(proj / "a-params.yaml", proj / "params.yaml")
        row.update(warm_rollout(run, proj))
    finally:
        shutil.rmtree(iteration_dir, ignore_errors=True)
        if aside.exists():
            aside.rename(iteration_dir)
        shutil.copy(proj / "later-params.yaml", proj / "params.yaml")


def warm_rollout(run: Run, proj: Path) -> dict:
    """The rollout stage again, through the warm start: its artifact must equal the direct run's."""
    direct = (proj / "data/iteration/rollout.parquet").read_bytes()
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["runtime"]["warm_start"] = True
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    warm_dir = proj / "warm"
    warm_dir.mkdir(mode=0o700, exist_ok=True)
    # Only a stage that a warm worker ran writes this file: a warm process that refused to serve (its log exists
    # all the same) lets the stage run directly, and the byte comparison would then test nothing.
    usage = warm_dir / "worker-usage.json"
    usage.unlink(missing_ok=True)
    extra = {"RLHF_WARM_DIR": str(warm_dir), "RLHF_WARM_IDLE": "5", "RLHF_WARM_RUSAGE": str(usage)}
    try:
        t = time.perf_counter()
        run.sh([sys.executable, str(ROOT / "stages/rollout.py")], proj, extra)
        row = {"wall_s": time.perf_counter() - t, "identical_rollout": (proj / "data/iteration/rollout.parquet")
               .read_bytes() == direct, "served_by_warm_process": usage.exists()}
    finally:
        p["runtime"]["warm_start"] = False
        (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        for pid_file in warm_dir.glob("*.pid"):  # the warm process exits when idle; no need to wait for it
            try:
                os.kill(int(pid_file.read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
    run.say(f"w rollout through the warm start: {row['wall_s']:.1f} s, served by the warm process "
            f"{row['served_by_warm_process']}, identical artifact {row['identical_rollout']}")
    return row


def part_c(run: Run, proj: Path, row: dict) -> None:
    """TRL's PPOTrainer on this project's models, prompt batch and PPO settings, at part b's shape, in a process of
    its own, with the micro-batch and checkpointing the preflight's memory check chose."""
    plan = run.result["preflight"]["trl_fit"]
    p = yaml.safe_load((proj / "params.yaml").read_text())
    policy = str(proj / p["paths"]["policy_model"])
    prompts = p["rollout"]["batch_size"]
    micro = plan["micro_batch"]
    cfg = {"device": run.args.device, "policy": policy, "value": policy, "reward": str(proj / p["paths"]["reward_model"]),
           "prompts": str(proj / p["paths"]["iteration"] / "batch.parquet"), "out": str(proj / "trl-out"),
           "dtype": "bfloat16", "threads": 1 if run.args.device == "cpu" else os.cpu_count(),
           "num_minibatches": p["ppo"]["num_minibatches"], "epochs": p["ppo"]["epochs"],
           "max_new_tokens": p["rollout"]["max_new_tokens"], "temperature": p["rollout"]["temperature"],
           "forward_batch": p["rollout"]["generation_chunk"], "kl_coef": p["kl"]["coef"], "lr": p["optim"]["lr"],
           "seed": p["seed"], "lora_r": p["lora"]["r"], "lora_alpha": p["lora"]["alpha"],
           "targets": p["lora"]["target_modules"], "micro_batch": micro,
           "gradient_accumulation": prompts // micro, "checkpointing": plan["checkpointing"]}
    (proj / "trl-config.json").write_text(json.dumps(cfg))
    row.update(shape={**shape(p), "micro_batch": micro}, checkpointing=plan["checkpointing"],
               estimate_gib=plan["gib"])
    start = time.perf_counter()
    run.sh([sys.executable, str(ROOT / "bench" / "trl_ppo_anchor.py"), str(proj / "trl-config.json"),
            str(proj / "trl.json")], proj)
    row.update(json.loads((proj / "trl.json").read_text()))
    row["wall_s"] = time.perf_counter() - start  # process wall time, start-up and imports included, as our stages'
    row["generated_tokens_per_s"] = row["generated_tokens"] / row["generate_s"]
    row["forward_batch"] = cfg["forward_batch"]


def part_d(run: Run, proj: Path, row: dict) -> None:
    """The same iteration with the data-parallel stages on 2 ranks: artifacts byte for byte, update numbers."""
    single = {a: (proj / "data/iteration" / a).read_bytes() for a in ARTIFACTS.values()}
    one = json.loads((proj / "metrics/update.json").read_text())
    row["nproc"] = 2
    iteration(run, proj, "d", row, nproc=2)
    two = json.loads((proj / "metrics/update.json").read_text())
    row["identical_artifacts"] = {a: (proj / "data/iteration" / a).read_bytes() == single[a] for a in ARTIFACTS.values()}
    row["update_rel_diff"] = {k: abs(two[k] - one[k]) / max(abs(one[k]), 1e-12)
                              for k in ("loss/policy", "loss/value", "grad_norm/policy")}


def part_seconds(own: float, left: float) -> float | None:
    """A part's deadline: its own, cut to what is left of the whole run; None when too little is left to start."""
    return None if left < MIN_PART else min(own, left)


# ---- the preflight -------------------------------------------------------------------------------------------------


def wheels_line() -> str:
    """What bench/gpu_run.sh installed (it says so in the environment), for the preflight's one line."""
    folder = os.environ.get("RLHF_GPU_WHEELS") or str(ROOT / "bench" / ".wheels")
    installed = int(os.environ.get("RLHF_GPU_WHEELS_INSTALLED") or 0)
    if installed:
        return f"{installed} carried wheels were installed from {folder}"
    return (f"no carried wheels in {folder}: run `bash bench/gpu_wheels.sh` where PyPI is reachable and name the "
            'folder in the device call, carry: ["bench/.wheels"]')


def missing_modules(parts: str) -> list[str]:
    """The parts' top-level modules this Python cannot find (a lookup, nothing imported: a second at most)."""
    names = {m.split(".")[0] for key in parts for m in IMPORTS.get(key, [])}
    return sorted(n for n in names if importlib.util.find_spec(n) is None)


def trl_plan(counts: dict, reward_params: int, prompts: int, micro: int, chunk: int, new_tokens: int,
             prompt_tokens: int, limit_gib: float, reserve: float) -> dict:
    """TRL PPOTrainer's peak GPU memory at part b's shape by the project's memory model (rlhf/reports/memory.py),
    without and then with gradient checkpointing; the first that fits `limit_gib` (×reserve), or none.

    One process holds the policy (bf16 base, shared with the reference as the adapter-disabled model), its LoRA (fp32
    weights, grads and AdamW moments), the critic as TRL trains it (a full bf16 copy of the policy with a score head:
    weights, grads and two moments), and the reward model. Its rollout decodes `chunk` rows with a KV cache, keeps
    bf16 logits over the whole sequence of the reference's forward and fp32 log-softmax temporaries over the
    responses; its update runs policy and critic in one graph per micro-batch (TRL's logits cover the whole
    sequence)."""
    from rlhf.reports.memory import Counts, activation_bytes

    c = Counts(**counts)
    seq = prompt_tokens + new_tokens
    bf16, fp32 = 2, 4
    weights = c.base * bf16 + c.lora * fp32 * 4 + (c.base + c.hidden + 1) * bf16 * 4 + reward_params * bf16
    kv = chunk * seq * c.layers * 2 * c.kv_heads * c.head_dim * bf16
    rollout = kv + chunk * seq * c.vocab * bf16 + chunk * new_tokens * c.vocab * fp32 * 3
    tried = []
    for checkpointing in (False, True):
        if checkpointing:  # one layer's input kept per layer, one layer's activations recomputed at a time
            kept = 2 * c.layers * micro * seq * c.hidden * bf16
            one = dataclasses.replace(c, layers=1)
            update = kept + activation_bytes(one, micro, seq, seq) + activation_bytes(one, micro, seq, 0)
        else:
            update = activation_bytes(c, micro, seq, seq) + activation_bytes(c, micro, seq, 0)
        gib = (weights + max(rollout, update)) / GIB
        tried.append({"checkpointing": checkpointing, "gib": round(gib, 2)})
        if gib * reserve <= limit_gib:
            return {"fits": True, "micro_batch": micro, "prompts": prompts, "checkpointing": checkpointing,
                    "gib": round(gib, 2), "limit_gib": limit_gib, "reserve": reserve, "tried": tried}
    return {"fits": False, "micro_batch": micro, "prompts": prompts, "gib": tried[-1]["gib"], "limit_gib": limit_gib,
            "reserve": reserve, "tried": tried}


def preflight_child(device: str, parts: str, plan_args: dict) -> dict:
    """In a process of its own (the check's process never touches the GPU): import what the parts import, read the
    versions and the device, size TRL's part."""
    import importlib
    import importlib.metadata

    errors = {}
    for name in dict.fromkeys(m for key in parts for m in IMPORTS.get(key, [])):
        try:
            importlib.import_module(name)
        except Exception as err:  # any failure to import is the preflight's finding
            errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    out = {"versions": versions, "import_errors": errors, "gpus": 0}
    if device == "cuda" and torch.cuda.is_available():
        versions["cudnn"] = torch.backends.cudnn.version()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            versions["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout else None
        except (OSError, subprocess.TimeoutExpired):
            versions["driver"] = None
        free, total = torch.cuda.mem_get_info()
        out.update(gpus=torch.cuda.device_count(), gpu=torch.cuda.get_device_name(),
                   capability=".".join(map(str, torch.cuda.get_device_capability())),
                   gpu_free_gib=free / GIB, gpu_total_gib=total / GIB,
                   gpu_used_gib=(total - free) / GIB)  # this process's CUDA context and whatever else holds it
    else:
        versions["cudnn"] = versions["driver"] = None
    if "c" in parts and not errors:
        from rlhf.reports.memory import RESERVE, count_policy, count_reward

        configs = ROOT / "models" / "configs"
        c = count_policy(configs, plan_args["lora_r"], plan_args["lora_alpha"], tuple(plan_args["targets"]))
        out["trl_fit"] = trl_plan(dataclasses.asdict(c), count_reward(configs), plan_args["prompts"],
                                  plan_args["micro"], plan_args["chunk"], plan_args["new_tokens"],
                                  plan_args["prompt_tokens"], plan_args["limit_gib"], RESERVE)
    return out


def preflight(run: Run, parts: str, work: Path) -> None:
    """Everything that can be known before anything heavy runs; a machine or environment unfit stops here (Stop)."""
    args = run.args
    t = time.perf_counter()
    missing = missing_modules(parts)
    if missing:
        raise Stop(f"preflight: not importable: {', '.join(missing)}; {wheels_line()}")
    need = DISK_GB["tiny" if args.tiny else "full"]
    free_disk = shutil.disk_usage(work).free / GB
    full = preset_params(work, args, quick=False)
    micro = args.trl_micro or full["rollout"]["micro_batch_size"]
    plan_args = {"lora_r": full["lora"]["r"], "lora_alpha": full["lora"]["alpha"],
                 "targets": full["lora"]["target_modules"], "prompts": full["rollout"]["batch_size"], "micro": micro,
                 "chunk": full["rollout"]["generation_chunk"], "new_tokens": full["rollout"]["max_new_tokens"],
                 "prompt_tokens": 512, "limit_gib": args.trl_limit_gib}
    child = subprocess.run([sys.executable, str(Path(__file__)), "preflight", str(work), "--device", args.device,
                            "--parts", parts, "--plan", json.dumps(plan_args)],
                           capture_output=True, text=True, env=env(), timeout=240)
    if child.returncode != 0:
        tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise Stop(f"preflight: the import check exited with {child.returncode}: {tail}")
    found = json.loads(child.stdout.strip().splitlines()[-1])
    run.result["versions"] = found.pop("versions")
    row = {**found, "free_disk_gb": round(free_disk, 1), "disk_needed_gb": need}
    run.result["preflight"] = row
    run.result["gpus"] = found["gpus"]
    run.result["gpu"] = found.get("gpu")
    row["s"] = time.perf_counter() - t
    run.save()
    if found["import_errors"]:
        names = ", ".join(f"{k} ({v})" for k, v in found["import_errors"].items())
        raise Stop(f"preflight: not importable: {names}; {wheels_line()}")
    if free_disk < need:
        raise Stop(f"preflight: {free_disk:.1f} GB free under {work}, the check writes about {need:.0f} GB")
    if args.device == "cuda":
        if not found["gpus"]:
            raise Stop("preflight: --device cuda, but torch sees no CUDA device")
        if found["gpu_used_gib"] > GPU_BUSY_GIB:
            raise Stop(f"preflight: {found['gpu_used_gib']:.1f} GiB of the GPU's {found['gpu_total_gib']:.1f} GiB are "
                       "in use before the check starts (another process holds it)")
    v = run.result["versions"]
    run.say(f"preflight ok in {row['s']:.1f} s: torch {v['torch']} (CUDA {v['cuda']}, cuDNN {v['cudnn']}, driver "
            f"{v['driver']}), transformers {v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}; "
            f"{free_disk:.0f} GB free disk" + (f"; {found['gpu']}: {found['gpu_free_gib']:.1f} of "
                                               f"{found['gpu_total_gib']:.1f} GiB free" if found.get("gpu") else ""))


# ---- the subcommands run in their own processes ----------------------------------------------------------------------


def decode_benchmark(proj: Path) -> None:
    """tokens/s of the rollout's generation on the batch, timed on the second of two identical passes, with the
    prefill (the prompts read into the KV cache) timed apart from the decode steps."""
    import torch

    os.chdir(proj)
    sys.path.insert(0, str(ROOT))
    from rlhf.config.params import load_params
    from rlhf.models import sampling
    from rlhf.models.checkpoint import load_actors
    from rlhf.models.sampling import generate

    params = load_params(Path("params.yaml"))
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    import pandas as pd

    prompts = pd.read_parquet(Path(params.paths.iteration) / "batch.parquet")["prompt_ids"].tolist()
    actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
    cuda = actors.device.is_cuda

    def sync():
        if cuda:
            torch.cuda.synchronize()

    prefill_s = [0.0]
    prefill = sampling.CachedLM.prefill

    def timed_prefill(self, *args, **kwargs):  # a sync either side: the decode steps that follow are not counted
        sync()
        t = time.perf_counter()
        out = prefill(self, *args, **kwargs)
        sync()
        prefill_s[0] += time.perf_counter() - t
        return out

    sampling.CachedLM.prefill = timed_prefill
    r = params.rollout
    times, prefills, tokens = [], [], 0
    for _ in range(2):  # the first pass is the warm-up (kernel selection, allocator growth, caches)
        prefill_s[0] = 0.0
        sync()
        t = time.perf_counter()
        out = generate(actors, prompts, r.max_new_tokens, r.temperature, r.top_p, params.seed, r.generation_chunk,
                       rows_per_pass=r.micro_batch_size)
        sync()
        times.append(time.perf_counter() - t)
        prefills.append(prefill_s[0])
        tokens = sum(len(x) for x in out)
    prompt_tokens = sum(len(p) for p in prompts)
    decode_s = times[1] - prefills[1]
    row = {"tokens": tokens, "prompt_tokens": prompt_tokens, "warmup_s": times[0], "timed_s": times[1],
           "tokens_per_s": tokens / times[1], "samples_per_s": len(prompts) / times[1], "prefill_s": prefills[1],
           "prefill_tokens_per_s": prompt_tokens / prefills[1], "decode_s": decode_s,
           "decode_tokens_per_s": tokens / decode_s}
    if cuda:
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    (proj / "decode.json").write_text(json.dumps(row))


# ---- the table -------------------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    parts = result["parts"]
    lines = []
    v = result.get("versions") or {}
    if v:
        lines += ["", f"torch {v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, driver {v.get('driver')}, "
                      f"transformers {v.get('transformers')}, peft {v.get('peft')}, accelerate {v.get('accelerate')}"]
    for key in ("a", "b"):
        part = parts.get(key, {})
        if not part.get("stages"):
            continue
        rows = dict(part["stages"])
        if "evaluate" in part:
            rows["evaluate"] = part["evaluate"]
        lines += ["", f"part {key} on {result.get('gpu') or result['device']}: {part.get('steps', '?')} PPO steps, bf16",
                  "", "| stage | wall s | start s | load s | compute s | peak GiB allocated | peak GiB reserved | "
                  "attention |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {name} | {s['wall_s']:.1f} | {s['start_s']:.1f} | {s['load_s']:.1f} | {s['compute_s']:.1f} | "
                  f"{s.get('peak_allocated_gib', 0):.2f} | {s.get('peak_reserved_gib', 0):.2f} | "
                  f"{'/'.join(s.get('attention') or []) or '-'}"
                  f"{' (SDPA ' + '/'.join(s['sdpa_backend']) + ')' if s.get('sdpa_backend') else ''} |"
                  for name, s in rows.items()]
        if "iteration_s" in part:
            lines.append(f"| **iteration** | **{part['iteration_s']:.1f}** | {part['start_s']:.1f} | "
                         f"{part['load_s']:.1f} | **{part['compute_s']:.1f}** | | | |")
            lines.append(f"\n{part['samples']} samples, {part['prompt_tokens'] + part['response_tokens']} tokens: "
                         f"{part['samples_per_s']:.2f} samples/s, {part['tokens_per_s']:.0f} tokens/s of stage compute "
                         f"(the iteration's six stages, evaluate apart)")
    b, t = parts.get("b", {}), parts.get("c", {})
    if "decode" in b:
        d = b["decode"]
        lines.append(f"\ndecode after a warm-up: {d['tokens_per_s']:.1f} tokens/s, {d['samples_per_s']:.2f} samples/s; "
                     f"prefill {d['prefill_tokens_per_s']:.0f} prompt tokens/s, decode steps "
                     f"{d['decode_tokens_per_s']:.1f} tokens/s")
    if t.get("status") == "skipped":
        lines.append(f"TRL: skipped ({t['reason']})")
    elif "error" in t:
        lines.append(f"TRL: failed ({t['error'].splitlines()[0]})")
    elif "iteration_s" in b and "wall_s" in t:
        lines += ["", f"| same work | ours | TRL {t['trl_version']} PPOTrainer |", "|---|---:|---:|",
                  f"| wall s, one iteration (process start-up and model loading included) | "
                  f"{b['iteration_s']:.1f} | {t['wall_s']:.1f} |",
                  f"| generate s | {b['generate_s']:.1f} | {t['generate_s']:.1f} |",
                  f"| peak GPU GiB reserved (ours: the largest stage) | {b.get('peak_reserved_gib', 0):.2f} | "
                  f"{t.get('peak_gpu_reserved_gib', 0):.2f} |",
                  "", f"ours/TRL: wall {b['iteration_s'] / t['wall_s']:.2f}× (TRL generates and scores in batches "
                  f"of {t['forward_batch']}, our generation chunk; its micro-batch {t['shape']['micro_batch']}, "
                  f"gradient checkpointing {'on' if t['checkpointing'] else 'off'})"]
    if "identical_artifacts" in parts.get("d", {}):
        d = parts["d"]
        lines.append(f"{d['nproc']} ranks vs 1: identical artifacts {d['identical_artifacts']}; update relative "
                     f"differences {', '.join(f'{k} {v:.1e}' for k, v in d['update_rel_diff'].items())}")
    return "\n".join(lines)


def failures_of(result: dict) -> list[str]:
    parts = result["parts"]
    failures = [f"part {k} {v['status']}" for k, v in parts.items() if v["status"] not in ("ok", "skipped")]
    for key in ("a", "b"):
        if parts.get(key, {}).get("first_minibatch_ratio_max_abs_dev", 0.0) != 0.0:
            failures.append(f"part {key}: first-minibatch ratio is not exactly 1")
    warm = parts.get("w", {})
    if "served_by_warm_process" in warm and not warm["served_by_warm_process"]:
        failures.append("the warm start did not serve the rollout (it ran directly; stages.log says why)")
    elif "identical_rollout" in warm and not warm["identical_rollout"]:
        failures.append("the warm-start rollout differs from the direct one")
    d = parts.get("d", {})
    if "identical_artifacts" in d and not all(d["identical_artifacts"].values()):
        failures.append("2-rank artifacts differ from the 1-process run")
    clock = result.get("clock", {})
    if clock.get("total_s", 0.0) > clock.get("limit_s", float("inf")):
        failures.append(f"the check took {clock['total_s']:.0f} s, over its {clock['limit_s']:.0f} s")
    return failures


def subcommand() -> None:
    sub = argparse.ArgumentParser()
    sub.add_argument("what")
    sub.add_argument("proj", type=Path)
    sub.add_argument("--device", default="cuda")
    sub.add_argument("--tiny", action="store_true")
    sub.add_argument("--parts", default=ORDER)
    sub.add_argument("--plan", default="{}")
    a = sub.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.what == "build":
        build_models(a.proj, a.device, a.tiny)
    elif a.what == "decode":
        decode_benchmark(a.proj)
    else:
        print(json.dumps(preflight_child(a.device, a.parts, json.loads(a.plan))))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("build", "decode", "preflight"):
        return subcommand()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny model shapes (the CPU rehearsal)")
    ap.add_argument("--parts", default=ORDER, help=f"which parts, in the order {ORDER} (d only with 2 GPUs or more)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of part d")
    ap.add_argument("--deadline", action="append", default=[], metavar="PART=SECONDS",
                    help=f"a part's deadline (defaults: {', '.join(f'{k}={v}' for k, v in PARTS.items())})")
    ap.add_argument("--total", type=float, default=TOTAL,
                    help=f"seconds for the whole check, preflight and cleanup included (default {TOTAL})")
    ap.add_argument("--trl-micro", type=int, default=None,
                    help="TRL's micro-batch rows in part c (default: ours, part b's rollout.micro_batch_size)")
    ap.add_argument("--trl-limit-gib", type=float, default=TRL_LIMIT_GIB,
                    help=f"part c runs where the memory model puts TRL's process at most this high (default "
                         f"{TRL_LIMIT_GIB})")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "metrics" / "gpu"))
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    args = ap.parse_args()
    deadlines = {**PARTS, **{k: float(v) for k, v in (d.split("=", 1) for d in args.deadline)}}
    run = Run(args.out, args)
    run.stop_with_signals()
    parts = [p for p in ORDER if p in args.parts]
    run.result.update(python=sys.version.split()[0], clock={"limit_s": args.total})
    proj = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    proj.mkdir(parents=True, exist_ok=True)
    try:
        try:
            preflight(run, "".join(parts), proj)
        except Stop as err:
            run.result["preflight"] = {**run.result.get("preflight", {}), "error": str(err)}
            run.save()
            run.say(f"error: {err}")
            raise SystemExit(2) from None
        except subprocess.TimeoutExpired:
            run.say("error: preflight: the import check took over 240 s")
            raise SystemExit(2) from None
        run.result["clock"]["preflight_s"] = time.monotonic() - T0
        gpus = run.result["gpus"]
        if "d" in parts:
            if gpus < args.nproc:  # a CPU rehearsal has none: its 2 gloo ranks are tests/test_distributed.py
                run.say(f"d skipped: {gpus} GPU{'s' if gpus != 1 else ''}, {args.nproc} ranks need {args.nproc}")
                parts.remove("d")
        functions = {"a": part_a, "b": part_b, "w": part_w, "c": part_c, "d": part_d}
        end = T0 + args.total - CLEANUP
        for key in parts:
            row = run.result["parts"][key] = {"status": "running"}
            fit = run.result["preflight"].get("trl_fit")
            allowed = part_seconds(deadlines[key], end - time.monotonic())
            start = time.perf_counter()
            if key == "c" and fit and not fit["fits"]:
                row.update(status="skipped", reason=f"TRL's process needs ~{fit['gib']:.1f} GiB at micro-batch "
                           f"{fit['micro_batch']} even with gradient checkpointing (memory model ×{fit['reserve']}); "
                           f"the limit is {fit['limit_gib']:.0f} GiB")
            elif allowed is None:
                row.update(status="timeout", error=f"not started: less than {MIN_PART} s left of --total "
                           f"{args.total:.0f}")
            else:
                run.deadline = time.monotonic() + allowed
                run.save()
                run.say(f"part {key} starts (deadline {allowed:.0f} s)")
                try:
                    functions[key](run, proj, row)
                    row["status"] = "ok"
                except Exception as err:  # a part's failure is its result; the later parts still run
                    row.update(status="timeout" if isinstance(err, Deadline) else "failed", error=str(err))
            row["part_s"] = time.perf_counter() - start
            gpu = next((s.get("gpu") for s in row.get("stages", {}).values() if isinstance(s, dict)), None)
            run.result["gpu"] = run.result.get("gpu") or gpu
            run.save()
            if row["status"] == "skipped":
                run.say(f"part {key} skipped: {row['reason']}")
            else:
                run.say(f"part {key} {row['status']} in {row['part_s']:.1f} s" +
                        (f": {row['error']}" if "error" in row else ""))
            if key == "a" and row["status"] != "ok":
                run.say("later parts need part a's models and state: stopping")
                break
    finally:
        t = time.monotonic()
        if args.keep is None:
            shutil.rmtree(proj, ignore_errors=True)
        run.result["clock"]["cleanup_s"] = time.monotonic() - t
    text = table(run.result)
    run.result["clock"]["total_s"] = time.monotonic() - T0
    run.save()
    run.say("results" + text.replace("\n", "\n    ") + f"\n    the check: {run.result['clock']['total_s']:.0f} s "
            f"of {args.total:.0f} (preflight {run.result['clock']['preflight_s']:.0f} s, cleanup "
            f"{run.result['clock']['cleanup_s']:.1f} s)")
    failures = failures_of(run.result)
    if failures:
        run.say("FAILED: " + "; ".join(failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
