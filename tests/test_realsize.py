"""Manual: one full iteration with the real Qwen3-0.6B architecture (random weights, real tokenizer) and a shrunken
Skywork-architecture reward model, every stage through the CLI, recording wall time and peak RSS per stage.

    .venv/bin/python -m pytest -m realsize -s tests/test_realsize.py
"""

import json
from pathlib import Path
import resource
import shutil
import time

import pytest
import yaml

from conftest import CONFIGS, ROOT, run, stage

pytestmark = pytest.mark.realsize


def test_real_size_iteration(tmp_path):
    from rlhf.models.architectures import build_policy, build_reward

    t0 = time.perf_counter()
    policy = build_policy(CONFIGS, tmp_path / "qwen3-0.6b-random", torch_dtype="bfloat16")
    reward = build_reward(CONFIGS, tmp_path / "skywork-shrunk", hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    build_s = time.perf_counter() - t0
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["policy_model"].update({"id": str(policy), "dtype": "bfloat16", "prompt_format": "chat"})
    p["reward_model"].update({"id": str(reward), "kind": "classifier", "dtype": "bfloat16"})
    p["data"].update({"eval_size": 4, "max_prompt_tokens": 256})
    p["rollout"].update({"batch_size": 4, "max_new_tokens": 32, "micro_batch_size": 2, "generation_chunk": 4})
    p["ppo"].update({"epochs": 1, "num_minibatches": 2})
    p["eval"].update({"max_new_tokens": 32})
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "data/tldr", work / "data/tldr")
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    rows = []
    commands = [stage("base_model", "policy"), stage("base_model", "reward"), stage("prepare"),
                ["rlhf", "init", "--no-baseline", "--no-track"]]
    commands += [stage(name) for name in ("sample", "rollout", "reward", "reference", "advantages", "update", "evaluate")]
    for cmd in commands:
        start = time.perf_counter()
        run(cmd, work)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # GiB, max over children so far
        rows.append((Path(cmd[1]).stem if cmd[0] != "rlhf" else "init", time.perf_counter() - start, peak))
    update = json.loads((work / "metrics/update.json").read_text())
    assert update["first_minibatch/ratio_max_abs_dev"] <= 1e-5
    print(f"\nbuild random Qwen3-0.6B + shrunk Skywork: {build_s:.0f}s")
    print("| stage | wall s | peak RSS so far (GiB) |\n|---|---:|---:|")
    for name, secs, peak in rows:
        print(f"| {name} | {secs:.1f} | {peak:.2f} |")
    print(f"| **iteration (sample → evaluate)** | {sum(r[1] for r in rows[4:]):.0f} | {max(r[2] for r in rows):.2f} |")
