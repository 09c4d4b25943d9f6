"""SIGKILL each stage (and `advance`) at random points; a rerun must give the uninterrupted run's artifacts."""

import hashlib
import os
import random
import signal
import subprocess
import time

import psutil
import pytest

from conftest import BIN, ROOT, copy_repo, run

POINTS = int(os.environ.get("RLHF_CRASH_POINTS", "1"))  # random kill points per stage (CI: 1)

DETERMINISTIC = {
    "rollout": ["data/iteration/rollout.parquet"],
    "reward": ["data/iteration/scores.parquet"],
    "reference": ["data/iteration/reference.parquet"],
    "advantages": ["data/iteration/advantages.parquet"],
    "update": ["models/next"],
    "evaluate": ["metrics/eval.json"],
}


def digest(path):
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def kill_after(cmd, cwd, delay, children_only=False):
    """SIGKILL the command (or, under `dvc repro`, the stage's own processes) after `delay` seconds."""
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    time.sleep(delay)
    if proc.poll() is None:
        if children_only:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        else:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_repo):
    repo = copy_repo(trained_repo, tmp_path_factory.mktemp("crash") / "repo")
    run(["dvc", "repro"], repo)  # the uninterrupted reference run of iteration 1
    return repo


@pytest.mark.parametrize("stage", list(DETERMINISTIC))
def test_killed_stage_then_repro_matches_uninterrupted_run(project, stage):
    reference = {p: digest(project / p) for p in DETERMINISTIC[stage]}
    rng = random.Random(stage)
    for delay in [rng.uniform(1.0, 7.0) for _ in range(POINTS)]:
        for p in DETERMINISTIC[stage]:  # the stage must rebuild its output, not find the old one
            target = project / p
            subprocess.run(["rm", "-rf", str(target)], check=True)
        kill_after(["dvc", "repro", "-s", stage], project, delay, children_only=True)
        for p in DETERMINISTIC[stage]:  # a killed stage leaves the complete output or none
            target = project / p
            assert not target.exists() or digest(target) == reference[p], f"{stage}: partial {p} after kill"
        run(["dvc", "repro"], project)
        for p in DETERMINISTIC[stage]:
            assert digest(project / p) == reference[p], f"{stage}: {p} differs after kill at {delay:.1f}s + repro"
        assert "up to date" in run(["dvc", "status"], project).stdout


def test_killed_advance_can_be_finished(project):
    work = project
    reference = digest(work / "models/next")
    for delay in (0.2, 0.6, 1.0, 2.5):
        kill_after(["rlhf", "advance"], work, delay)
        state = (work / "models/current/state.json")
        assert state.exists(), "models/current vanished"
        run(["rlhf", "advance"], work, check=False)  # finishes (or reports there is nothing left to do)
        assert digest(work / "models/current") == reference
        assert "up to date" in run(["dvc", "status", "models/current.dvc"], work).stdout
