"""Side by side on the same work: this pipeline (every stage as its own process, model loading included) vs TRL
1.12's PPOTrainer in its own virtual environment. Prints a table and writes metrics/bench.json; then each of our
phases next to its limit, measured in the same run: its work (matmul FLOPs from rlhf/reports/flops.py; for the
generation also the weight bytes its decoding steps read) at this machine's matmul rate and memory read bandwidth.

    .venv/bin/python bench/compare_trl.py --reps 3 --trl-reps 3
    .venv/bin/python bench/compare_trl.py --dtype float32 --reps 1 --trl-reps 0   # our side and its limits only

Same for both: SmolLM2-135M-Instruct policy (converted once), critic initialised from the benchmark reward model
(SmolLM2 + a seeded score head), that reward model, the same 16 TL;DR prompts, 53 new tokens, temperature 0.7,
top-p 1, 4 PPO epochs × 4 minibatches, LoRA r=32/α=64 on the 7 projections, bf16 (both; --dtype float32 for fp32).
Not equal by design, and said in the output: TRL trains its critic fully (ours: a LoRA adapter on the shared base),
TRL feeds the policy's token ids to the reward model (ours decodes and re-tokenises; same tokenizer here, so the
same ids). Implementation choices that differ but do the same work: ours generates in length-sorted chunks of 8
prompts from the merged policy with its own sampling loop, TRL with generate() in chunks of its
local_rollout_forward_batch_size (4) padded to the whole batch's longest prompt; ours uses its chunked causal
attention (rlhf/models/attention.py) for the policy, critic and reward model, TRL transformers' SDPA.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
TRL_VENV = ROOT / "bench" / ".venv-trl"
STAGES = ["sample", "rollout", "reward", "reference", "advantages", "update"]
TIMED = """import resource, subprocess, sys, time, json
t = time.perf_counter(); r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t
print(json.dumps({"rc": r.returncode, "s": dt, "rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2}))"""


def sh(cmd, cwd=None, env=None) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return out.stdout


def timed(cmd, cwd, env) -> dict:
    out = sh([sys.executable, "-c", TIMED, *cmd], cwd=cwd, env=env)
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"{cmd} failed in {cwd}")
    return result


def env() -> dict:
    return {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CI": "1"}


def setup_trl_venv() -> Path:
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        sh([sys.executable, "-m", "venv", str(TRL_VENV)])
        sh([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"])
        sh([str(py), "-m", "pip", "install", "-q", "trl==1.12.0", "peft", "transformers", "datasets", "pandas",
            "pyarrow", "accelerate"])
    return py


def setup_project(dtype: str) -> Path:
    """A fresh project with our pipeline, the converted policy and a seeded SmolLM2 sequence-classifier RM."""
    proj = WORK / f"ours-{dtype}"
    shutil.rmtree(proj, ignore_errors=True)
    proj.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy2(ROOT / name, proj / name)
    shutil.copytree(ROOT / "data" / "tldr", proj / "data" / "tldr")
    policy = WORK / "smollm2"
    if not policy.exists():
        p0 = WORK / "convert"
        shutil.rmtree(p0, ignore_errors=True)
        p0.mkdir(parents=True)
        shutil.copy2(ROOT / "params.yaml", p0 / "params.yaml")
        sh(stage_cmd("base_model", "policy"), cwd=p0, env=env())
        shutil.move(str(p0 / "models/base/policy"), policy)
    reward = WORK / "reward-smollm2-cls"
    if not reward.exists():
        code = ("import torch; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T;"
                f"torch.manual_seed(0); m=M.from_pretrained('{policy}', num_labels=1);"
                "m.config.pad_token_id=m.config.eos_token_id;"
                f"m.save_pretrained('{reward}'); T.from_pretrained('{policy}').save_pretrained('{reward}')")
        sh([sys.executable, "-c", code])
    p = yaml.safe_load((proj / "params.yaml").read_text())
    p["policy_model"].update({"id": str(policy), "dtype": dtype})
    p["reward_model"].update({"id": str(reward), "kind": "classifier", "dtype": dtype, "attention": "chunked"})
    p["rollout"].update({"batch_size": 16, "max_new_tokens": 53, "temperature": 0.7, "top_p": 1.0,
                         "micro_batch_size": 4, "generation_chunk": 8})
    p["ppo"].update({"epochs": 4, "num_minibatches": 4})
    p["runtime"].update({"progress": "off"})
    (proj / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for cmd in (stage_cmd("base_model", "policy"), stage_cmd("base_model", "reward"), stage_cmd("prepare"),
                ["rlhf", "init", "--no-baseline", "--no-track"]):
        sh(cmd, cwd=proj, env=env())
    return proj


def stage_cmd(name: str, *args: str) -> list[str]:
    """A stage script of this checkout, run in a project folder as dvc.yaml runs it."""
    return [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args]


def run_ours(proj: Path) -> dict:
    """One iteration, one process per stage as `dvc repro` runs them. The warm process (runtime.warm_start) is
    stopped first, so each run pays its imports once; a stage's peak RSS is its worker's, and the warm process's
    own RSS is added on top (an upper bound: most of its pages are shared with the worker)."""
    shutil.rmtree(proj / "data" / "iteration", ignore_errors=True)
    shutil.rmtree(proj / "models" / "next", ignore_errors=True)
    sh(["rlhf", "warm", "stop"], cwd=proj, env=env())
    usage = WORK / "worker-rusage.json"
    row = {"system": "ours"}
    for stage in STAGES:
        usage.unlink(missing_ok=True)
        r = timed(stage_cmd(stage), proj, {**env(), "RLHF_WARM_RUSAGE": str(usage)})
        worker_gib = json.loads(usage.read_text())["maxrss_kib"] / 1024**2 if usage.exists() else 0.0
        row[f"{stage}_s"], row[f"{stage}_rss_gib"] = r["s"], max(r["rss"], worker_gib)
    row["warm_process_rss_gib"] = warm_rss_gib(proj)
    rollout = json.loads((proj / "metrics" / "rollout.json").read_text())
    update = json.loads((proj / "metrics" / "update.json").read_text())
    row["total_s"] = sum(row[f"{s}_s"] for s in STAGES)
    row["peak_stage_rss_gib"] = max(row[f"{s}_rss_gib"] for s in STAGES)
    row["peak_rss_gib"] = row["peak_stage_rss_gib"] + row["warm_process_rss_gib"]
    row["peak_rss_stage"] = max(STAGES, key=lambda s: row[f"{s}_rss_gib"])
    row.update({"generate_s": rollout["generate_seconds"], "generated_tokens_per_s": rollout["generated_tokens_per_s"],
                "update_compute_s": update["update_seconds"],
                "first_minibatch_ratio_max_abs_dev": update["first_minibatch/ratio_max_abs_dev"]})
    sh(["rlhf", "warm", "stop"], cwd=proj, env=env())
    return row


def warm_rss_gib(proj: Path) -> float:
    """RSS of the warm process (0 when runtime.warm_start is off)."""
    out = sh(["rlhf", "warm", "status"], cwd=proj, env=env())
    return sum(float(line.split()[3]) for line in out.splitlines() if line.startswith("pid "))


def limits(dtype: str) -> dict:
    """This machine's limits, measured in the same run: matmul throughput in the benchmark's dtype and in bf16, and
    the memory read bandwidth a decoding step streams its weights at."""
    import torch

    from rlhf.runtime.device import matmul_gflops, read_bandwidth_gbs

    return {"matmul_gflops": matmul_gflops(getattr(torch, dtype)), "bf16_matmul_gflops": matmul_gflops(torch.bfloat16),
            "read_gbs": read_bandwidth_gbs()}


def phase_work(proj: Path) -> dict:
    """The work of each of our phases for this run's rollout (rlhf/reports/flops.py: real tokens, causal
    attention, logits where they are computed): FLOPs, and for the generation also the weight bytes its decoding
    steps read (once per step, whatever the number of rows)."""
    import pandas as pd
    from transformers import AutoConfig

    from rlhf.config.params import load_params
    from rlhf.models.passes import length_sorted_groups
    from rlhf.reports.flops import Shape, forward_flops, lora_backward_flops

    params = load_params(proj / "params.yaml")
    policy = Shape.of(AutoConfig.from_pretrained(proj / params.paths.policy_model))
    reward = Shape.of(AutoConfig.from_pretrained(proj / params.paths.reward_model))
    rollout = pd.read_parquet(proj / params.paths.iteration / "rollout.parquet")
    prompts = [len(p) for p in rollout["prompt_ids"]]
    responses = rollout["response_length"].tolist()
    full = [p + r for p, r in zip(prompts, responses)]
    r_tokens = sum(responses)
    lora = (params.lora.r, params.lora.target_modules)
    critic = (params.critic.lora_r, params.lora.target_modules)
    # Decoding steps: chunks of length-sorted prompts, each decoded until its longest response ends; each step
    # (and each prefill pass) reads every weight once.
    chunk_of = length_sorted_groups(prompts, params.rollout.generation_chunk)  # the sampler's chunks
    chunks = [[i for i, c in enumerate(chunk_of) if c == k] for k in range(max(chunk_of) + 1)]
    per_pass = params.rollout.micro_batch_size
    weight_reads = sum(max(responses[i] for i in c) - 1 + -(-len(c) // per_pass) for c in chunks)
    element = 2 if params.policy_model.dtype == "bfloat16" else 4
    generate = forward_flops(policy, [n - 1 for n in full], r_tokens)  # merged policy: no adapter matmuls
    update_pass = (forward_flops(policy, full, r_tokens, *lora) + lora_backward_flops(policy, full, r_tokens, *lora)
                   + forward_flops(policy, full, 0, *critic) + lora_backward_flops(policy, full, 0, *critic))
    return {
        "generate_flops": generate, "generate_weight_bytes": weight_reads * policy.weight_bytes(element),
        "logprobs_flops": forward_flops(policy, full, r_tokens, *lora),  # the rollout stage's recomputed log-probs
        "reward_flops": forward_flops(reward, full, 0),  # ≈: the reward model's own rendering of the same text
        "reference_flops": forward_flops(policy, full, r_tokens) + forward_flops(policy, full, 0, *critic),
        "update_flops": params.ppo.epochs * update_pass,
    }


def limit_rows(o: dict, work: dict, lim: dict) -> list[tuple[str, str, float, float]]:
    """(phase, work, seconds, seconds at the limit) for each phase; a stage's seconds include its start-up."""
    roof, bw = lim["matmul_gflops"] * 1e9, lim["read_gbs"] * 1e9
    def tflop(flops: int) -> str:
        return f"{flops / 1e12:.2f} TFLOP"

    gen_flops, gen_bytes = work["generate_flops"], work["generate_weight_bytes"]
    return [
        ("generate (decode + prefill)", f"{tflop(gen_flops)} + {gen_bytes / 1e9:.1f} GB of weights read",
         o["generate_s"], max(gen_flops / roof, gen_bytes / bw)),
        ("rollout stage minus generate (log-probs; start-up, loading)", tflop(work["logprobs_flops"]),
         o["rollout_s"] - o["generate_s"], work["logprobs_flops"] / roof),
        ("reward stage", "≈" + tflop(work["reward_flops"]), o["reward_s"], work["reward_flops"] / roof),
        ("reference stage (reference log-probs, values)", tflop(work["reference_flops"]), o["reference_s"],
         work["reference_flops"] / roof),
        ("update: forward + backward of the epochs (update_seconds)", tflop(work["update_flops"]), o["update_compute_s"],
         work["update_flops"] / roof),
        ("update stage (start-up, loading, saving included)", tflop(work["update_flops"]), o["update_s"],
         work["update_flops"] / roof),
    ]


def limit_table(o: dict, work: dict, lim: dict, dtype: str) -> str:
    head = ("| our phase | work | s | s at the limit | % of limit |\n|---|---|---:|---:|---:|\n")
    body = "\n".join(f"| {name} | {w} | {s:.1f} | {at:.1f} | {100 * at / s:.0f}% |"
                      for name, w, s, at in limit_rows(o, work, lim))
    return (head + body + f"\n\nlimits measured in this run: {dtype} matmul {lim['matmul_gflops']:.0f} GFLOP/s "
            f"(bf16 {lim['bf16_matmul_gflops']:.0f}), memory read {lim['read_gbs']:.1f} GB/s; the generation's limit is "
            "the larger of its FLOPs at the matmul rate and its weight reads at the read rate")


def median_row(rows: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rows) if isinstance(rows[0][k], (int, float)) else rows[0][k]
            for k in rows[0]}


def run_trl(proj: Path, dtype: str) -> dict:
    py = setup_trl_venv()
    out = subprocess.run([sys.executable, "-c", TIMED, str(py), str(ROOT / "bench" / "trl_ppo_anchor.py"),
                          str(write_trl_config(proj, dtype))], capture_output=True, text=True, env=env())
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if len(lines) < 2:
        raise SystemExit(f"TRL run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    row, outer = json.loads(lines[-2]), json.loads(lines[-1])
    row["total_s"] = outer["s"]  # process wall time, start-up and imports included
    row["peak_rss_gib"] = outer["rss"]
    row["generated_tokens_per_s"] = row["generated_tokens"] / row["generate_s"]
    return row


def table(o: dict, t: dict, dtype: str, reps: tuple[int, int]) -> str:
    ours_score = o["reward_s"] + o["reference_s"] + o["advantages_s"]
    rows = [
        ("prompt batch (ours: `sample`)", f"{o['sample_s']:.1f} s", "in load"),
        ("start-up, imports, model loading", "in each stage", f"{t['load_s']:.1f} s"),
        ("rollout: generate", f"{o['generate_s']:.1f} s", f"{t['generate_s']:.1f} s"),
        ("rollout stage total (start-up, load, generate, log-probs)", f"{o['rollout_s']:.1f} s", ""),
        ("reward + reference/values + advantages (3 stages)", f"{ours_score:.1f} s",
         f"{t['score_and_update_s']:.1f} s (scoring and update together)"),
        ("PPO update, 4 epochs × 4 minibatches (stage total)", f"{o['update_s']:.1f} s", "↑"),
        ("**total wall, one iteration**", f"**{o['total_s']:.1f} s**", f"**{t['total_s']:.1f} s**"),
        ("**peak RSS**", f"**{o['peak_rss_gib']:.2f} GiB** ({o['peak_rss_stage']} stage "
         f"{o['peak_stage_rss_gib']:.2f} + warm process {o['warm_process_rss_gib']:.2f})", f"**{t['peak_rss_gib']:.2f} GiB**"),
        ("generated tokens/s", f"{o['generated_tokens_per_s']:.1f}", f"{t['generated_tokens_per_s']:.1f}"),
    ]
    head = f"| phase ({dtype}, medians of {reps[0]} / {reps[1]} runs) | ours | TRL 1.12 PPOTrainer |\n|---|---:|---:|\n"
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)


NOT_EQUAL = ("not equal by design: TRL trains a full critic (ours: a LoRA adapter on the shared base, as in the "
             "product); TRL pads every prompt to the batch's longest, ours packs length-sorted micro-batches; ours "
             "recomputes log-probs after sampling (so the first PPO minibatch has ratio exactly 1), TRL takes them "
             "from the sampling logits; ours samples with its own loop from the policy merged into the base "
             "(W + (α/r)·BA), TRL with generate() through the adapter; ours runs its own chunked causal attention "
             "(policy and reward model), TRL SDPA; ours counts each stage's process start-up and model loading, "
             "TRL one process; ours forks its model stages from a warm process that imports torch/transformers/peft "
             "once per iteration (stopped before each run, so its start-up is inside the rollout stage's time)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--trl-reps", type=int, default=3, help="0: our side only (not written to metrics/)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    proj = setup_project(args.dtype)
    ours, trl_rows = [], []
    for i in range(max(args.reps, args.trl_reps)):  # interleaved, so drift in machine speed hits both alike
        if i < args.reps:
            ours.append(run_ours(proj))
            print(f"ours run {i + 1}: {ours[-1]['total_s']:.1f} s, {ours[-1]['peak_rss_gib']:.2f} GiB", flush=True)
        if i < args.trl_reps:
            trl_rows.append(run_trl(proj, args.dtype))
            print(f"TRL run {i + 1}: {trl_rows[-1]['total_s']:.1f} s, {trl_rows[-1]['peak_rss_gib']:.2f} GiB", flush=True)
    o, lim, work = median_row(ours), limits(args.dtype), phase_work(proj)
    if not trl_rows:  # --trl-reps 0: our side and its limits only; metrics/bench.* keep the last side by side
        print(f"\nours ({args.dtype}, median of {args.reps}): {o['total_s']:.1f} s, peak RSS {o['peak_rss_gib']:.2f} GiB"
              "\n\n" + limit_table(o, work, lim, args.dtype))
        return
    t = median_row(trl_rows)
    result = {"dtype": args.dtype, "reps_ours": args.reps, "reps_trl": args.trl_reps, "ours": o, "trl": t,
              "ours_runs": ours, "trl_runs": trl_rows,
              "ratio_total": o["total_s"] / t["total_s"], "ratio_peak_rss": o["peak_rss_gib"] / t["peak_rss_gib"],
              "limits": lim, "work": work,
              "ours_at_limit": {name: {"s": s, "s_at_limit": at} for name, _, s, at in limit_rows(o, work, lim)},
              "not_equal": NOT_EQUAL}
    text = table(o, t, args.dtype, (args.reps, args.trl_reps))
    text += (f"\n\nours/TRL: total wall {result['ratio_total']:.2f}×, peak RSS {result['ratio_peak_rss']:.2f}×; "
             f"first-minibatch |ratio−1| in ours: {o['first_minibatch_ratio_max_abs_dev']:.1e}\n\n"
             + limit_table(o, work, lim, args.dtype) + "\n\n" + NOT_EQUAL + "\n")
    (ROOT / "metrics").mkdir(exist_ok=True)
    (ROOT / "metrics" / "bench.json").write_text(json.dumps(result, indent=2))
    (ROOT / "metrics" / "bench.md").write_text(text)
    print("\n" + text)


def write_trl_config(proj: Path, dtype: str) -> Path:
    p = yaml.safe_load((proj / "params.yaml").read_text())
    cfg = {"policy": p["policy_model"]["id"], "reward": p["reward_model"]["id"],
           "prompts": str(proj / "data/iteration/batch.parquet"), "out": str(WORK / "trl-out"), "dtype": dtype,
           "threads": os.cpu_count(), "num_minibatches": 4, "epochs": 4, "max_new_tokens": 53, "temperature": 0.7,
           "forward_batch": 4, "kl_coef": p["kl"]["coef"], "lr": p["optim"]["lr"], "seed": p["seed"],
           "lora_r": 32, "lora_alpha": 64, "targets": p["lora"]["target_modules"]}
    path = WORK / "trl-config.json"
    path.write_text(json.dumps(cfg))
    return path


if __name__ == "__main__":
    main()
