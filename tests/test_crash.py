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

POINTS = int(os.environ.get("RLHF_CRASH_POINTS", "1"))  # extra random kill points per stage beyond the two fixed ranges

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


def stage_seconds(stage, cwd) -> float:
    """How long the stage's own process runs under `dvc repro -f -s` (from its start to its exit)."""
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started = None
    while proc.poll() is None:
        if started is None and stage_processes(proc.pid):
            started = time.time()
        elif started is not None and not stage_processes(proc.pid):
            break
        time.sleep(0.02)
    proc.wait()
    return time.time() - (started or time.time())


def kill_after(cmd, cwd, delay, children_only=False) -> bool:
    """SIGKILL the command after `delay` s, or with children_only (under `dvc repro`) the stage's own processes
    `delay` s after they start. Returns whether the kill hit a running process."""
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    hit = False
    if children_only:  # wait for the stage script's own process, then time the kill from its start
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not stage_processes(proc.pid):
            time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is None:
        if children_only:
            targets = stage_processes(proc.pid)
            for child in targets:
                child.kill()
            hit = bool(targets)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            hit = True
    proc.wait()
    return hit


def stage_processes(pid: int) -> list:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(part.startswith("stages/") and part.endswith(".py") for part in child.cmdline()):  # a stage script
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_repo):
    repo = copy_repo(trained_repo, tmp_path_factory.mktemp("crash") / "repo")
    run(["dvc", "repro"], repo)  # the uninterrupted reference run of iteration 1
    return repo


@pytest.mark.parametrize("stage", list(DETERMINISTIC))
def test_killed_stage_then_repro_matches_uninterrupted_run(project, stage):
    reference = {p: digest(project / p) for p in DETERMINISTIC[stage]}
    rng = random.Random(stage)
    hits = 0
    duration = stage_seconds(stage, project)
    # One point in the first half of the stage's run (imports, loading), one in the second (compute, write).
    fractions = [rng.uniform(0.05, 0.5), rng.uniform(0.5, 0.95)] + [rng.uniform(0.05, 0.95) for _ in range(POINTS - 1)]
    for delay in [f * duration for f in fractions]:
        # On a busy machine (the suite run twice at once) one run of a stage can take less than half as long as the
        # measured one; a kill that came after the stage had finished is retried at half the delay.
        for _ in range(4):
            for p in DETERMINISTIC[stage]:  # the stage must rebuild its output, not find the old one
                target = project / p
                subprocess.run(["rm", "-rf", str(target)], check=True)
            # -f: really run the stage (DVC would otherwise restore the missing output from its cache)
            hit = kill_after(["dvc", "repro", "-f", "-s", stage], project, delay, children_only=True)
            for p in DETERMINISTIC[stage]:  # a killed stage leaves the complete output or none
                target = project / p
                assert not target.exists() or digest(target) == reference[p], f"{stage}: partial {p} after kill"
            run(["dvc", "repro"], project)
            for p in DETERMINISTIC[stage]:
                assert digest(project / p) == reference[p], f"{stage}: {p} differs after kill at {delay:.1f}s + repro"
            assert "up to date" in run(["dvc", "status"], project).stdout
            hits += hit
            if hit:
                break
            delay /= 2
    assert hits >= 1, f"{stage}: no kill landed while the stage ran"


def test_killed_advance_can_be_finished(project, tmp_path):
    """Each kill hits a fresh copy of the repro'd project: a kill on an already advanced copy would test nothing.
    The kill points are fractions of an uninterrupted advance's own run time, so they land while it works."""
    files = ["models/current", "models/current.dvc", "metrics/history.csv", "metrics/train_history.csv",
             "metrics/samples"]
    done = copy_repo(project, tmp_path / "uninterrupted")
    start = time.time()
    run(["rlhf", "advance"], done)
    duration = time.time() - start
    reference = {p: digest(done / p) for p in files}
    hits = 0
    for k, fraction in enumerate((0.15, 0.4, 0.65, 0.9)):
        work = copy_repo(project, tmp_path / f"killed-{k}")
        hits += kill_after(["rlhf", "advance"], work, fraction * duration)
        assert (work / "models/current/state.json").exists(), "models/current vanished"
        run(["rlhf", "advance"], work, check=False)  # finishes (or reports there is nothing left to do)
        for p in files:
            assert digest(work / p) == reference[p], f"{p} differs after a kill at {fraction * duration:.1f} s + advance"
        assert "up to date" in run(["dvc", "status", "models/current.dvc"], work).stdout
    assert hits >= 3, f"only {hits} of 4 kills landed while advance ran ({duration:.1f} s uninterrupted)"
