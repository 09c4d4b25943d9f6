"""The GPU check: the Qwen3 + Skywork pipeline on one GPU machine, in parts ordered by value, each under its own
deadline, every result written under --out as soon as its part ends. Run it through bench/gpu_run.sh (which installs
the carried wheels first); `--device cpu --tiny` is its CPU rehearsal (tests/test_gpu_check.py).

    bash bench/gpu_run.sh                        # on the GPU machine: everything below, ~9 minutes at most
    bash bench/gpu_run.sh --device cpu --tiny    # the same script on a CPU with tiny shapes

Parts (`--parts`, default all):
  a  quick check: random-weight Qwen3-0.6B + Skywork-Reward-V2-Qwen3-8B architectures built on the device in bf16,
     the base-model, prepare and init steps, then one PPO iteration of 8 prompts × 1 epoch through the real stage
     scripts; then the rollout stage again through the warm start (a fork of a process that imported torch), whose
     artifact must equal the direct run's byte for byte.
  b  the full iteration: 64 prompts × 53 new tokens, 4 epochs × 2 minibatches, LoRA r=32 on the 7 projections; then
     a decode benchmark (a warm-up pass, then a timed pass) for tokens/s.
  c  TRL 1.12's PPOTrainer (bench/trl_ppo_anchor.py) on the same models, prompts and PPO settings, side by side.
  d  the data-parallel stages on 2 torchrun ranks against the 1-process run (only with 2 GPUs or more).

Each stage is its own process, as `dvc repro` runs it; its memory is read when it exits: the allocator's peak
allocated and reserved bytes and the whole device's used bytes (the CUDA context and other processes included).
Out: gpu.json (the results so far), gpu-run.log (one line per stage and part) and stages.log (the stages' output).
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["sample", "rollout", "reward", "reference", "advantages", "update"]
PARALLEL = ["rollout", "reward", "reference", "update"]  # the stages dvc.yaml runs through runtime.launcher
ARTIFACTS = {"rollout": "rollout.parquet", "reward": "scores.parquet", "reference": "reference.parquet"}
# What the GPU image lacks, as bench/gpu_wheels.sh downloads it (exact versions: the cp311 rehearsal and the cp312
# GPU run install the same ones). pydantic for the params; TRL and what it imports for part c; rouge-score and nltk
# for the evaluation's ROUGE.
WHEELS = ["pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
          "trl==1.12.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "nltk==3.10.4"]
SDIST_WHEELS = ["rouge-score==0.1.2"]  # published as a source archive only: built into a pure-Python wheel
PARTS = {"a": 240, "b": 180, "c": 120, "d": 120}  # default deadlines, seconds
# All parts together (--total): each part's deadline is cut to what is left of it, and a part with less than
# MIN_PART seconds left is not started, so the parts end within TOTAL however long each takes. 540 s leaves a
# 10-minute command limit a minute for installing the wheels, starting Python and the table.
TOTAL = 540
MIN_PART = 20
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
GIB = 1024**3
# Runs a stage script in this process and records its wall time and device memory when it exits (run_stage ends
# with sys.exit, so the record is written in `finally`). One file per torchrun rank.
PROBE = """import json, os, runpy, sys, time
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
start = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    torch = sys.modules.get("torch")  # a torch-free stage's wall time must not include importing it here
    record = {"s": time.perf_counter() - start, "gpu": None}
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        free, total = torch.cuda.mem_get_info()
        record.update(gpu=torch.cuda.get_device_name(), peak_allocated=torch.cuda.max_memory_allocated(),
                      peak_reserved=torch.cuda.max_memory_reserved(), device_used=total - free,
                      context=total - free - torch.cuda.memory_reserved())
    with open(out.format(rank=os.environ.get("RANK", "0")), "w") as f:
        json.dump(record, f)
"""


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
        self.stage_log.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), **(extra_env or {})}, stdout=self.stage_log,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
        self.child = proc
        try:
            code = proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise Deadline(f"{Path(str(cmd[-1])).name}: killed at the part's deadline") from None
        finally:
            self.child = None
        if code != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd[-2:]))} exited with {code} (output: stages.log)")


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
    prompts = 8 if quick else 64
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
    start = time.perf_counter()
    run.sh([*launch, str(probe), str(out), str(ROOT / "stages" / f"{name}.py")], proj, extra_env)
    row = {"wall_s": time.perf_counter() - start}
    ranks = [json.loads(Path(str(out).format(rank=r)).read_text()) for r in range(nproc)]
    if ranks[0]["gpu"]:
        row["gpu"] = ranks[0]["gpu"]
        for key in ("peak_allocated", "peak_reserved", "device_used", "context"):
            row[f"{key}_gib"] = max(r[key] for r in ranks) / GIB
    return row


def iteration(run: Run, proj: Path, label: str, nproc: int = 1) -> dict:
    shutil.rmtree(proj / "data" / "iteration", ignore_errors=True)
    shutil.rmtree(proj / "models" / "next", ignore_errors=True)
    stages = {}
    for name in STAGES:
        stages[name] = run_stage(run, proj, name, nproc if name in PARALLEL else 1)
        s = stages[name]
        memory = (f"; peak {s['peak_allocated_gib']:.2f} GiB allocated, {s['peak_reserved_gib']:.2f} reserved, "
                  f"{s['device_used_gib']:.2f} used on the device" if "gpu" in s else "")
        run.say(f"{label} {name}: {s['wall_s']:.1f} s{memory}")
    return stages


def summary(proj: Path, stages: dict) -> dict:
    rollout = json.loads((proj / "metrics/rollout.json").read_text())
    update = json.loads((proj / "metrics/update.json").read_text())
    row = {"stages": stages, "iteration_s": sum(s["wall_s"] for s in stages.values()),
           "rollout_generated_tokens_per_s": rollout["generated_tokens_per_s"],
           "generate_s": rollout["generate_seconds"], "steps": update["steps"],
           "first_minibatch_ratio_max_abs_dev": update["first_minibatch/ratio_max_abs_dev"]}
    if any("gpu" in s for s in stages.values()):
        row["peak_reserved_gib"] = max(s.get("peak_reserved_gib", 0.0) for s in stages.values())
        row["peak_allocated_gib"] = max(s.get("peak_allocated_gib", 0.0) for s in stages.values())
    return row


# ---- the parts -----------------------------------------------------------------------------------------------------


def part_a(run: Run, proj: Path) -> dict:
    args = run.args
    (proj / "data").mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "data" / "tldr", proj / "data" / "tldr", dirs_exist_ok=True)
    start = time.perf_counter()
    run.sh([sys.executable, str(Path(__file__)), "build", str(proj), "--device", args.device,
            *(["--tiny"] if args.tiny else [])], proj)
    run.say(f"a models built on {args.device}: {time.perf_counter() - start:.1f} s")
    write_params(proj, args, quick=True)
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["policy_model"].update({"id": str(proj / "built/policy"), "revision": None})
    p["reward_model"].update({"id": str(proj / "built/reward"), "revision": None})
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for step in (["base_model.py", "policy"], ["base_model.py", "reward"], ["prepare.py"]):
        t = time.perf_counter()
        run.sh([sys.executable, str(ROOT / "stages" / step[0]), *step[1:]], proj)
        run.say(f"a {' '.join(step)}: {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    run.sh([sys.executable, "-m", "rlhf.cli", "init", "--no-baseline", "--no-track"], proj)
    run.say(f"a init: {time.perf_counter() - t:.1f} s")
    row = summary(proj, iteration(run, proj, "a"))
    row["warm_start"] = warm_rollout(run, proj)
    return row


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
    run.say(f"a rollout through the warm start: {row['wall_s']:.1f} s, served by the warm process "
            f"{row['served_by_warm_process']}, identical artifact {row['identical_rollout']}")
    return row


def part_b(run: Run, proj: Path) -> dict:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    full = preset_params(proj, run.args, quick=False)
    for section in ("rollout", "ppo"):
        p[section] = full[section]
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    row = summary(proj, iteration(run, proj, "b"))
    run.sh([sys.executable, str(Path(__file__)), "decode", str(proj)], proj)
    row["decode"] = json.loads((proj / "decode.json").read_text())
    run.say(f"b decode after a warm-up: {row['decode']['tokens_per_s']:.1f} tokens/s")
    return row


def part_c(run: Run, proj: Path) -> dict:
    """TRL's PPOTrainer on this project's models, prompt batch and PPO settings, in a process of its own."""
    p = yaml.safe_load((proj / "params.yaml").read_text())
    policy = str(proj / p["paths"]["policy_model"])
    cfg = {"device": run.args.device, "policy": policy, "value": policy, "reward": str(proj / p["paths"]["reward_model"]),
           "prompts": str(proj / p["paths"]["iteration"] / "batch.parquet"), "out": str(proj / "trl-out"),
           "dtype": "bfloat16", "threads": 1 if run.args.device == "cpu" else os.cpu_count(),
           "num_minibatches": p["ppo"]["num_minibatches"], "epochs": p["ppo"]["epochs"],
           "max_new_tokens": p["rollout"]["max_new_tokens"], "temperature": p["rollout"]["temperature"],
           "forward_batch": p["rollout"]["generation_chunk"], "kl_coef": p["kl"]["coef"], "lr": p["optim"]["lr"],
           "seed": p["seed"], "lora_r": p["lora"]["r"], "lora_alpha": p["lora"]["alpha"],
           "targets": p["lora"]["target_modules"]}
    (proj / "trl-config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    run.sh([sys.executable, str(ROOT / "bench" / "trl_ppo_anchor.py"), str(proj / "trl-config.json"),
            str(proj / "trl.json")], proj)
    row = json.loads((proj / "trl.json").read_text())
    row["wall_s"] = time.perf_counter() - start  # process wall time, start-up and imports included, as our stages'
    row["generated_tokens_per_s"] = row["generated_tokens"] / row["generate_s"]
    row["forward_batch"] = cfg["forward_batch"]
    return row


def part_d(run: Run, proj: Path) -> dict:
    """The same iteration with the data-parallel stages on 2 ranks: artifacts byte for byte, update numbers."""
    single = {a: (proj / "data/iteration" / a).read_bytes() for a in ARTIFACTS.values()}
    one = json.loads((proj / "metrics/update.json").read_text())
    stages = iteration(run, proj, "d", nproc=2)
    two = json.loads((proj / "metrics/update.json").read_text())
    same = {a: (proj / "data/iteration" / a).read_bytes() == single[a] for a in ARTIFACTS.values()}
    rel = {k: abs(two[k] - one[k]) / max(abs(one[k]), 1e-12) for k in ("loss/policy", "loss/value", "grad_norm/policy")}
    return {"nproc": 2, "identical_artifacts": same, "update_rel_diff": rel,
            "stages": {k: v["wall_s"] for k, v in stages.items()}}


def part_seconds(own: float, left: float) -> float | None:
    """A part's deadline: its own, cut to what is left of the whole run; None when too little is left to start."""
    return None if left < MIN_PART else min(own, left)


def gpu_count(device: str) -> int:
    """Asked in a child process: this one never initialises CUDA (it holds no device memory while stages run)."""
    if device != "cuda":
        return 0
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                         capture_output=True, text=True, env=env())
    return int(out.stdout.strip() or 0)


# ---- the subcommands run in their own processes ----------------------------------------------------------------------


def decode_benchmark(proj: Path) -> None:
    """tokens/s of the rollout's generation on the batch, timed on the second of two identical passes."""
    import torch

    os.chdir(proj)
    sys.path.insert(0, str(ROOT))
    from rlhf.config.params import load_params
    from rlhf.models.checkpoint import load_actors
    from rlhf.models.sampling import generate

    params = load_params(Path("params.yaml"))
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    import pandas as pd

    prompts = pd.read_parquet(Path(params.paths.iteration) / "batch.parquet")["prompt_ids"].tolist()
    actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
    r = params.rollout
    times, tokens = [], 0
    for _ in range(2):  # the first pass is the warm-up (kernel selection, allocator growth, caches)
        if actors.device.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate(actors, prompts, r.max_new_tokens, r.temperature, r.top_p, params.seed, r.generation_chunk)
        if actors.device.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        tokens = sum(len(x) for x in out)
    row = {"tokens": tokens, "warmup_s": times[0], "timed_s": times[1], "tokens_per_s": tokens / times[1],
           "samples_per_s": len(prompts) / times[1]}
    if actors.device.is_cuda:
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    (proj / "decode.json").write_text(json.dumps(row))


# ---- the table -------------------------------------------------------------------------------------------------------


def table(result: dict) -> str:
    parts = result["parts"]
    lines = []
    for key in ("a", "b"):
        part = parts.get(key, {})
        if "stages" not in part:
            continue
        lines += ["", f"part {key} on {result.get('gpu') or result['device']}: {part['steps']} PPO steps, bf16", "",
                  "| stage | wall s | peak GiB allocated | peak GiB reserved |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {s['wall_s']:.1f} | {s.get('peak_allocated_gib', 0):.2f} | "
                  f"{s.get('peak_reserved_gib', 0):.2f} |" for name, s in part["stages"].items()]
        lines.append(f"| **iteration** | **{part['iteration_s']:.1f}** | | |")
    b, t = parts.get("b", {}), parts.get("c", {})
    if "decode" in b:
        lines.append(f"\ndecode after a warm-up: {b['decode']['tokens_per_s']:.1f} tokens/s, "
                     f"{b['decode']['samples_per_s']:.2f} samples/s")
    if "error" in t:
        lines.append(f"TRL: failed ({t['error'].splitlines()[0]})")
    elif "stages" in b and "wall_s" in t:
        lines += ["", f"| same work | ours | TRL {t['trl_version']} PPOTrainer |", "|---|---:|---:|",
                  f"| wall s, one iteration (process start-up and model loading included) | "
                  f"{b['iteration_s']:.1f} | {t['wall_s']:.1f} |",
                  f"| generate s | {b['generate_s']:.1f} | {t['generate_s']:.1f} |",
                  f"| peak GPU GiB reserved (ours: the largest stage) | {b.get('peak_reserved_gib', 0):.2f} | "
                  f"{t.get('peak_gpu_reserved_gib', 0):.2f} |",
                  "", f"ours/TRL: wall {b['iteration_s'] / t['wall_s']:.2f}× (TRL generates and scores in batches "
                  f"of {t['forward_batch']}, our generation chunk)"]
    if "identical_artifacts" in parts.get("d", {}):
        d = parts["d"]
        lines.append(f"{d['nproc']} ranks vs 1: identical artifacts {d['identical_artifacts']}; update relative "
                     f"differences {', '.join(f'{k} {v:.1e}' for k, v in d['update_rel_diff'].items())}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("build", "decode"):
        sub = argparse.ArgumentParser()
        sub.add_argument("what")
        sub.add_argument("proj", type=Path)
        sub.add_argument("--device", default="cuda")
        sub.add_argument("--tiny", action="store_true")
        a = sub.parse_args()
        sys.path.insert(0, str(ROOT))
        return build_models(a.proj, a.device, a.tiny) if a.what == "build" else decode_benchmark(a.proj)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny model shapes (the CPU rehearsal)")
    ap.add_argument("--parts", default="abcd", help="which parts, in order (d runs only with 2 GPUs or more)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks of part d")
    ap.add_argument("--deadline", action="append", default=[], metavar="PART=SECONDS",
                    help=f"a part's deadline (defaults: {', '.join(f'{k}={v}' for k, v in PARTS.items())})")
    ap.add_argument("--total", type=float, default=TOTAL,
                    help=f"seconds for all parts together (default {TOTAL}); a part gets at most what is left")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "metrics" / "gpu"))
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    args = ap.parse_args()
    deadlines = {**PARTS, **{k: float(v) for k, v in (d.split("=", 1) for d in args.deadline)}}
    run = Run(args.out, args)
    run.stop_with_signals()
    gpus = gpu_count(args.device)
    parts = [p for p in args.parts if p in PARTS]
    if "d" in parts:
        if gpus < args.nproc:  # a CPU rehearsal has none: its 2 gloo ranks are tests/test_distributed.py
            run.say(f"d skipped: {gpus} GPU{'s' if gpus != 1 else ''}, {args.nproc} ranks need {args.nproc}")
            parts.remove("d")
    run.result.update(gpus=gpus, python=sys.version.split()[0])
    proj = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    functions = {"a": part_a, "b": part_b, "c": part_c, "d": part_d}
    end = time.monotonic() + args.total
    try:
        for key in parts:
            allowed = part_seconds(deadlines[key], end - time.monotonic())
            start = time.perf_counter()
            if allowed is None:
                row, status = {"error": f"not started: less than {MIN_PART} s left of --total {args.total:.0f}"}, \
                    "timeout"
            else:
                run.deadline = time.monotonic() + allowed
                run.say(f"part {key} starts (deadline {allowed:.0f} s)")
                try:
                    row = functions[key](run, proj)
                    status = "ok"
                except Exception as err:  # a part's failure is its result; the later parts still run
                    row, status = {"error": str(err)}, "timeout" if isinstance(err, Deadline) else "failed"
            row.update(status=status, part_s=time.perf_counter() - start)
            run.result["parts"][key] = row
            gpu = next((s.get("gpu") for s in row.get("stages", {}).values() if isinstance(s, dict)), None)
            run.result["gpu"] = run.result.get("gpu") or gpu
            run.save()
            run.say(f"part {key} {status} in {row['part_s']:.1f} s" + (f": {row['error']}" if "error" in row else ""))
            if key == "a" and status != "ok":
                run.say("later parts need part a's models and state: stopping")
                break
    finally:
        if args.keep is None:
            shutil.rmtree(proj, ignore_errors=True)
    text = table(run.result)
    run.say("results" + text.replace("\n", "\n    "))
    failures = [f"part {k} {v['status']}" for k, v in run.result["parts"].items() if v["status"] != "ok"]
    for key in ("a", "b"):
        if run.result["parts"].get(key, {}).get("first_minibatch_ratio_max_abs_dev", 0.0) != 0.0:
            failures.append(f"part {key}: first-minibatch ratio is not exactly 1")
    warm = run.result["parts"].get("a", {}).get("warm_start", {})
    if warm and not warm["served_by_warm_process"]:
        failures.append("the warm start did not serve the rollout (it ran directly; stages.log says why)")
    elif warm and not warm["identical_rollout"]:
        failures.append("the warm-start rollout differs from the direct one")
    d = run.result["parts"].get("d", {})
    if "identical_artifacts" in d and not all(d["identical_artifacts"].values()):
        failures.append("2-rank artifacts differ from the 1-process run")
    if failures:
        run.say("FAILED: " + "; ".join(failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
