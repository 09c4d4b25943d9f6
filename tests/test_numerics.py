"""The numeric setting of a model stage (rlhf/runtime/numerics.py): the same whether the stage is served by the warm
process or runs directly, so that the rollout's log-prob pass and the update's first forward agree bit for bit."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import BIN, ROOT, full_params, sharded_project, stage
from rlhf.runtime.numerics import resolve_threads

PROBE = '''"""A stage that only reports what it would compute with."""
from rlhf.runtime.stage import run_stage


def main(params, out):
    import json
    import os
    from pathlib import Path

    import torch

    Path(out).write_text(json.dumps({"threads": torch.get_num_threads(), "cpus": sorted(os.sched_getaffinity(0)),
                                     "warm": bool(os.environ.get("RLHF_WARM_WORKER"))}))


if __name__ == "__main__":
    run_stage(main)
'''


def run_probe(folder, params_file: str, out: str, cpus=None) -> dict:
    """The probe stage of the workspace `folder` (its own copy of rlhf/, as a stage requires), on `cpus`."""
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(folder)}
    env.pop("OMP_NUM_THREADS", None)
    done = subprocess.run([sys.executable, str(folder / "stages" / "probe_stage.py"), "--params", params_file,
                           str(folder / out)], cwd=folder, env=env, capture_output=True, text=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((folder / out).read_text())


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to narrow a command to one")
def test_a_stage_served_warm_computes_with_its_commands_cpus_like_a_direct_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    shutil.copytree(ROOT / "rlhf", tmp_path / "rlhf", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "probe_stage.py").write_text(PROBE)
    for name, warm in (("warm.yaml", True), ("direct.yaml", False)):
        (tmp_path / name).write_text(yaml.safe_dump(full_params(runtime={"warm_start": warm, "threads": 0})))
    every = run_probe(tmp_path, "warm.yaml", "every.json")  # starts the warm process with every CPU
    one = {min(os.sched_getaffinity(0))}
    warm = run_probe(tmp_path, "warm.yaml", "warm.json", one)  # `taskset -c 0 python stages/…`, served warm
    direct = run_probe(tmp_path, "direct.yaml", "direct.json", one)
    assert every["warm"] and warm["warm"] and not direct["warm"]
    assert every["threads"] == resolve_threads(0) >= 1
    assert warm == {**direct, "warm": True} and direct["threads"] == 1 and direct["cpus"] == sorted(one)


def test_threads_zero_resolves_to_one_count_per_core_or_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert resolve_threads(3) == 3
    assert 1 <= resolve_threads(0) <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert resolve_threads(0) == 5 and resolve_threads(2) == 2


def blas_calls(output: str) -> list[str]:
    """MKL's own record of each BLAS call (MKL_VERBOSE=1): `... Dyn:<0|1> ... NThr:<n>`."""
    return [line for line in output.splitlines() if line.startswith("MKL_VERBOSE") and "NThr:" in line]


def test_every_blas_call_of_rollout_and_update_runs_at_the_recorded_thread_count(tmp_path, tiny_policy,
                                                                                 tiny_reward):
    """With `runtime.threads: 0` and no explicit count, MKL kept its dynamic mode (Dyn:1), choosing per call how many
    threads to use, which it may lower when the machine is busy; on MKL's Intel kernels the sums then depend on the
    load, which is how a first-minibatch ratio can be 1 alone and 1 ± 3e-5 under a busy CI run. Every call must run
    with dynamic mode off, at the count the stage records in numerics/threads."""
    folder = sharded_project(tmp_path, tiny_policy, tiny_reward)
    p = yaml.safe_load((folder / "params.yaml").read_text())
    p["runtime"].update({"threads": 0, "warm_start": False})
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "MKL_VERBOSE": "1", "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    calls = {}
    for name in ("rollout", "reward", "reference", "advantages", "update"):
        done = subprocess.run(stage(name), cwd=folder, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        calls[name] = blas_calls(done.stdout + done.stderr)
    if not calls["update"]:
        pytest.skip("this torch build does not call MKL (no MKL_VERBOSE lines)")
    for name in ("rollout", "update"):
        threads = json.loads((folder / "metrics" / f"{name}.json").read_text())["numerics/threads"]
        assert threads == resolve_threads(0)
        modes = {(f"Dyn:{line.split('Dyn:')[1][0]}", f"NThr:{line.split('NThr:')[1].split()[0]}")
                 for line in calls[name]}
        assert modes == {("Dyn:0", f"NThr:{threads}")}, (name, modes)
