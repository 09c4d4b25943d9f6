"""One Qwen3 + Skywork PPO iteration on a GPU, through the real stage scripts: prints a table and writes
metrics/gpu.json (per-stage wall time and peak GPU memory, generated tokens/s, the first-minibatch ratio, the GPU).

    pip install --no-index --find-links bench/.wheels pydantic pyyaml   # once, on a machine without them
    python bench/gpu_check.py                 # full size: Qwen3-0.6B + Skywork-Reward-V2-Qwen3-8B architectures
    python bench/gpu_check.py --quick         # 8 prompts, 1 PPO epoch
    python bench/gpu_check.py --nproc 2       # also the data-parallel stages on 2 torchrun ranks, compared
    python bench/gpu_check.py --trl           # also TRL 1.12's PPOTrainer on the same models and work
    python bench/gpu_check.py --device cpu --tiny --quick --trl   # the CPU rehearsal (tiny shapes)

The models are random-weight copies of the Qwen3 + Skywork architectures built from models/configs (no hub needed),
initialised directly on the device. Qwen3 + Skywork configuration: 64 prompts × 53 new tokens, 4 PPO epochs × 2 minibatches,
LoRA r=32 on the 7 projections, bf16 base, chat prompts, `attention: auto`. Each stage runs as its own process (as
`dvc repro` runs them) in a temporary project; its peak memory is torch.cuda.max_memory_allocated in that process
(so it starts from zero for every stage).

`--trl` then runs TRL 1.12's PPOTrainer (bench/trl_ppo_anchor.py, as bench/compare_trl.py does on the CPU) in its own
process on the same built models, the same prompt batch, new tokens, temperature, epochs × minibatches, LoRA and KL
coefficient, and prints the side-by-side wall time and peak GPU memory. TRL is the benchmark anchor, never a
dependency: it and the packages the GPU image lacks (datasets, dill, multiprocess) are installed with --no-deps into
bench/.trl-site, a folder only the TRL process imports from, from bench/.wheels (bench/gpu_wheels.sh) when that
holds them, else from the package index. Not equal by design: TRL trains a full critic (ours a LoRA adapter on the
shared base), feeds the reward model the policy's token ids (ours renders the reward model's chat template), and
takes its old log-probs from the sampling logits (ours recomputes them, so the first minibatch's ratio is exactly 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
TRL_SITE = ROOT / "bench" / ".trl-site"
WHEELS = ROOT / "bench" / ".wheels"
# TRL 1.12 and what it imports that the GPU image lacks (its other requirements are there); the versions tested here
TRL_PACKAGES = ["trl==1.12.0", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
# Runs a stage script in this process and records its wall time and peak device memory when it exits (run_stage
# ends with sys.exit, so the record is written in `finally`). One file per torchrun rank.
PROBE = """import json, os, runpy, sys, time
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
start = time.perf_counter()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    import torch
    on_gpu = torch.cuda.is_available() and torch.cuda.is_initialized()
    record = {"s": time.perf_counter() - start, "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else 0,
              "gpu": torch.cuda.get_device_name() if on_gpu else None}
    with open(out.format(rank=os.environ.get("RANK", "0")), "w") as f:
        json.dump(record, f)
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "CI": "1", "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}


def sh(cmd: list[str], cwd: Path) -> None:
    out = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                         f"{out.stderr[-5000:]}")


def preset_params(proj: Path, args) -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    sys.path.insert(0, str(ROOT))
    from rlhf.config.presets import PRESETS

    for section, values in PRESETS["qwen3-skywork"].items():
        p[section].update(values)
    p["policy_model"].update({"id": str(proj / "built/policy"), "revision": None})
    p["reward_model"].update({"id": str(proj / "built/reward"), "revision": None})
    p["data"].update({"source": "local", "split": "validation", "eval_size": 8})
    prompts = 8 if args.quick else 64
    minibatches = 2
    # the preset's generation chunk and micro-batch, at most what the batch and its minibatches hold
    chunk = min(p["rollout"]["generation_chunk"], prompts)
    micro = min(p["rollout"]["micro_batch_size"], prompts // minibatches)
    p["rollout"].update({"batch_size": prompts, "max_new_tokens": 53, "generation_chunk": chunk,
                         "micro_batch_size": micro})
    p["ppo"].update({"epochs": 1 if args.quick else 4, "num_minibatches": minibatches})
    # One BLAS thread per process on a CPU rehearsal with ranks, so 1 and N processes run the same kernels.
    threads = 1 if args.device == "cpu" and args.nproc > 1 else 0
    p["runtime"].update({"device": args.device, "warm_start": False, "progress": "off", "threads": threads})
    if args.tiny:
        p["data"]["max_prompt_tokens"] = 200
        p["data"]["overlong"] = "truncate"
    return p


def build_models(proj: Path, args) -> None:
    """Random-weight Qwen3 + Skywork architectures, initialised on the device, written where the base-model stages would."""
    import torch

    from rlhf.models.architectures import build_policy, build_reward

    sizes = TINY if args.tiny else {}
    configs = ROOT / "models" / "configs"
    with torch.device(args.device):
        build_policy(configs, proj / "built/policy", torch_dtype="bfloat16", **sizes)
        build_reward(configs, proj / "built/reward", torch_dtype="bfloat16", **sizes)
    if args.device == "cuda":
        torch.cuda.empty_cache()


def setup(proj: Path, args) -> None:
    (proj / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "data" / "tldr", proj / "data" / "tldr")
    build_models(proj, args)
    (proj / "params.yaml").write_text(yaml.safe_dump(preset_params(proj, args), sort_keys=False))
    init = ("from rlhf.config.params import load_params; from rlhf.project import init; "
            "init(load_params('params.yaml'), evaluate_baseline=False, track=False)")
    for cmd in ([sys.executable, str(ROOT / "stages/base_model.py"), "policy"],
                [sys.executable, str(ROOT / "stages/base_model.py"), "reward"],
                [sys.executable, str(ROOT / "stages/prepare.py")], [sys.executable, "-c", init]):
        sh(cmd, proj)
    shutil.rmtree(proj / "built")  # the base-model stages copied the weights


def run_stage(proj: Path, name: str, nproc: int) -> dict:
    probe = proj / "probe.py"
    probe.write_text(PROBE)
    out = proj / f"probe-{name}-{{rank}}.json"
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", str(nproc)]
    start = time.perf_counter()
    sh([*launch, str(probe), str(out), str(ROOT / "stages" / f"{name}.py")], proj)
    wall = time.perf_counter() - start
    ranks = [json.loads(Path(str(out).format(rank=r)).read_text()) for r in range(nproc)]
    return {"wall_s": wall, "peak_gib": max(r["peak_bytes"] for r in ranks) / 1024**3, "gpu": ranks[0]["gpu"]}


def iteration(proj: Path, nproc: int) -> dict:
    shutil.rmtree(proj / "data" / "iteration", ignore_errors=True)
    shutil.rmtree(proj / "models" / "next", ignore_errors=True)
    return {name: run_stage(proj, name, nproc if name in PARALLEL else 1) for name in STAGES}


def compare_ranks(proj: Path, args) -> dict:
    """The same iteration with the data-parallel stages on `nproc` ranks: artifacts byte for byte, update numbers."""
    single = {a: (proj / "data/iteration" / a).read_bytes() for a in ARTIFACTS.values()}
    one = json.loads((proj / "metrics/update.json").read_text())
    stages = iteration(proj, args.nproc)
    two = json.loads((proj / "metrics/update.json").read_text())
    same = {a: (proj / "data/iteration" / a).read_bytes() == single[a] for a in ARTIFACTS.values()}
    rel = {k: abs(two[k] - one[k]) / max(abs(one[k]), 1e-12) for k in ("loss/policy", "loss/value", "grad_norm/policy")}
    return {"nproc": args.nproc, "identical_artifacts": same, "update_rel_diff": rel,
            "stages": {k: v["wall_s"] for k, v in stages.items()}}


def trl_site() -> Path:
    """The folder TRL is imported from (bench/.trl-site), installed once."""
    if (TRL_SITE / "trl").is_dir():
        return TRL_SITE
    # bench/.wheels first (the GPU machine has no index); the index when those wheels are not for this Python
    sources = [["--no-index", "--find-links", str(WHEELS)]] if any(WHEELS.glob("trl-*.whl")) else []
    errors = []
    for source in [*sources, []]:
        out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "--no-deps", "--target", str(TRL_SITE), *source, *TRL_PACKAGES],
                             capture_output=True, text=True)
        if out.returncode == 0:
            return TRL_SITE
        errors.append(out.stderr[-1500:])
    raise RuntimeError("installing TRL into bench/.trl-site failed:\n" + "\n".join(errors))


def run_trl(proj: Path, args) -> dict:
    """TRL's PPOTrainer on this project's models, prompt batch and PPO settings, in a process of its own."""
    p = yaml.safe_load((proj / "params.yaml").read_text())
    policy = str(proj / p["paths"]["policy_model"])
    cfg = {"device": args.device, "policy": policy, "value": policy, "reward": str(proj / p["paths"]["reward_model"]),
           "prompts": str(proj / p["paths"]["iteration"] / "batch.parquet"), "out": str(proj / "trl-out"),
           "dtype": "bfloat16", "threads": os.cpu_count(), "num_minibatches": p["ppo"]["num_minibatches"],
           "epochs": p["ppo"]["epochs"], "max_new_tokens": p["rollout"]["max_new_tokens"],
           "temperature": p["rollout"]["temperature"], "forward_batch": p["rollout"]["generation_chunk"],
           "kl_coef": p["kl"]["coef"], "lr": p["optim"]["lr"], "seed": p["seed"], "lora_r": p["lora"]["r"],
           "lora_alpha": p["lora"]["alpha"], "targets": p["lora"]["target_modules"]}
    (proj / "trl-config.json").write_text(json.dumps(cfg))
    trl_env = {**env(), "PYTHONPATH": str(trl_site())}  # TRL's folder only, not this project's package
    start = time.perf_counter()
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trl_ppo_anchor.py"), str(proj / "trl-config.json")],
                         cwd=proj, env=trl_env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"TRL run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    row = json.loads(lines[-1])
    row["wall_s"] = wall  # process wall time, start-up and imports included, as each of our stages is timed
    row["generated_tokens_per_s"] = row["generated_tokens"] / row["generate_s"]
    row["forward_batch"] = cfg["forward_batch"]
    return row


def table(result: dict) -> str:
    lines = [f"GPU check on {result['gpu'] or result['device']} ({result['config']})", "",
             "| stage | wall s | peak GiB |", "|---|---:|---:|"]
    lines += [f"| {name} | {s['wall_s']:.1f} | {s['peak_gib']:.2f} |" for name, s in result["stages"].items()]
    lines += [f"| **iteration** | **{result['iteration_s']:.1f}** | **{result['peak_gib']:.2f}** |", "",
              f"generated tokens/s: {result['generated_tokens_per_s']:.1f}; first-minibatch |ratio−1|: "
              f"{result['first_minibatch_ratio_max_abs_dev']:.1e}"]
    if "ranks" in result:
        r = result["ranks"]
        lines.append(f"{r['nproc']} ranks vs 1: identical artifacts {r['identical_artifacts']}; update relative "
                     f"differences {', '.join(f'{k} {v:.1e}' for k, v in r['update_rel_diff'].items())}")
    if "trl" in result:
        t = result["trl"]
        if "error" in t:
            lines.append(f"TRL: failed ({t['error'].splitlines()[0]})")
        else:
            lines += ["", f"| same work | ours | TRL {t['trl_version']} PPOTrainer |",
                      "|---|---:|---:|",
                      f"| wall s, one iteration (process start-up and model loading included) | "
                      f"{result['iteration_s']:.1f} | {t['wall_s']:.1f} |",
                      f"| generate s | {result['generate_s']:.1f} | {t['generate_s']:.1f} |",
                      f"| generated tokens/s | {result['generated_tokens_per_s']:.1f} | "
                      f"{t['generated_tokens_per_s']:.1f} |",
                      f"| peak GPU GiB (ours: the largest stage) | {result['peak_gib']:.2f} | {t['peak_gpu_gib']:.2f} |",
                      "", f"ours/TRL: wall {result['iteration_s'] / t['wall_s']:.2f}×"
                      + (f", peak GPU memory {result['peak_gib'] / t['peak_gpu_gib']:.2f}×" if t["peak_gpu_gib"] else "")
                      + f" (TRL generates and scores in batches of {t['forward_batch']}, our generation chunk)"]
    return "\n".join(lines)


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny model shapes (the CPU rehearsal)")
    ap.add_argument("--quick", action="store_true", help="8 prompts, 1 PPO epoch")
    ap.add_argument("--nproc", type=int, default=1, help="also run the data-parallel stages on N torchrun ranks")
    ap.add_argument("--trl", action="store_true", help="also TRL 1.12's PPOTrainer on the same models and work")
    ap.add_argument("--out", type=Path, default=ROOT / "metrics" / "gpu.json")
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    args = ap.parse_args()
    proj = args.keep or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        setup(proj, args)
        stages = iteration(proj, 1)
        rollout = json.loads((proj / "metrics/rollout.json").read_text())
        update = json.loads((proj / "metrics/update.json").read_text())
        result = {"device": args.device, "gpu": stages["rollout"]["gpu"],
                  "config": f"{'tiny' if args.tiny else 'full-size'}, {'quick' if args.quick else 'qwen3-skywork'}: "
                            f"{update['steps']} PPO steps, bf16",
                  "stages": stages, "iteration_s": sum(s["wall_s"] for s in stages.values()),
                  "peak_gib": max(s["peak_gib"] for s in stages.values()),
                  "generated_tokens_per_s": rollout["generated_tokens_per_s"],
                  "generate_s": rollout["generate_seconds"],
                  "first_minibatch_ratio_max_abs_dev": update["first_minibatch/ratio_max_abs_dev"]}
        write(args.out, result)  # kept if what follows fails or runs out of device time
        if args.nproc > 1:
            result["ranks"] = compare_ranks(proj, args)
            write(args.out, result)
        if args.trl:
            try:
                result["trl"] = run_trl(proj, args)
            except RuntimeError as e:  # our numbers stand; the table says TRL failed and why
                result["trl"] = {"error": str(e)}
    finally:
        if args.keep is None:
            shutil.rmtree(proj, ignore_errors=True)
    write(args.out, result)
    print(table(result))
    if "error" in result.get("trl", {}):
        print(result["trl"]["error"], file=sys.stderr)
    failures = []
    if result["first_minibatch_ratio_max_abs_dev"] != 0.0:
        failures.append("first-minibatch ratio is not exactly 1")
    if "error" in result.get("trl", {}):
        failures.append("the TRL run failed")
    if "ranks" in result and not all(result["ranks"]["identical_artifacts"].values()):
        failures.append(f"{args.nproc}-rank artifacts differ from the 1-process run")
    if failures:
        raise SystemExit("FAILED: " + "; ".join(failures))


if __name__ == "__main__":
    main()
