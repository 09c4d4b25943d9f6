"""bench/gpu_check.py without a GPU: the params it writes pass validation in every mode (a GPU session must not
find out there), its table renders our side and TRL's, and (slow) the whole CPU rehearsal runs."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.config.params import parse_params

ROOT = Path(__file__).resolve().parent.parent


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def args(**kw):
    base = {"device": "cuda", "tiny": False, "quick": False, "nproc": 1, "trl": False}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("mode", [{}, {"quick": True}, {"device": "cpu", "tiny": True, "quick": True, "nproc": 2}])
def test_preset_params_are_valid_in_every_mode(tmp_path, mode):
    params = parse_params(gpu_check().preset_params(tmp_path, args(**mode)))
    r = params.rollout
    assert r.batch_size == (8 if mode.get("quick") else 64)
    assert r.batch_size % (r.micro_batch_size * params.ppo.num_minibatches) == 0
    assert r.generation_chunk <= r.batch_size
    assert params.ppo.epochs == (1 if mode.get("quick") else 4)
    assert params.policy_model.dtype == "bfloat16" and params.runtime.device == (mode.get("device") or "cuda")


def test_table_shows_both_sides_and_a_failed_trl_run():
    stage = {"wall_s": 10.0, "peak_gib": 3.0, "gpu": "GPU"}
    result = {"device": "cuda", "gpu": "GPU", "config": "full-size", "stages": {"rollout": stage, "update": stage},
              "iteration_s": 20.0, "peak_gib": 3.0, "generated_tokens_per_s": 100.0, "generate_s": 5.0,
              "first_minibatch_ratio_max_abs_dev": 0.0,
              "trl": {"wall_s": 40.0, "generate_s": 8.0, "generated_tokens_per_s": 50.0, "peak_gpu_gib": 6.0,
                      "trl_version": "1.12.0", "forward_batch": 64}}
    text = gpu_check().table(result)
    assert "| wall s, one iteration (process start-up and model loading included) | 20.0 | 40.0 |" in text
    assert "ours/TRL: wall 0.50×, peak GPU memory 0.50×" in text
    result["trl"] = {"error": "TRL run failed (1):\nTraceback"}
    assert "TRL: failed (TRL run failed (1):)" in gpu_check().table(result)


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_stage(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--quick", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["stages"]) == ["sample", "rollout", "reward", "reference", "advantages", "update"]
    assert result["first_minibatch_ratio_max_abs_dev"] == 0.0 and result["generated_tokens_per_s"] > 0
