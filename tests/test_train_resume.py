"""`rlhf train` brings the run to train.iterations: a finished run does nothing, an interrupted one continues from
DVC's cached stages, and Ctrl-C says in one line where it stopped and how to continue."""

import csv
import os
import signal
import subprocess
import time

import psutil
import pytest
import yaml

from conftest import BIN, ROOT, copy_repo, ran_stages, run


def set_iterations(repo, n):
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["train"]["iterations"] = n
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def iterations(repo, name="history.csv"):
    return [int(r["iteration"]) for r in csv.DictReader((repo / "metrics" / name).open())]


def test_train_twice_the_second_does_nothing(trained_repo, tmp_path):
    """The trained repo holds iteration 1; with train.iterations 1 a second `rlhf train` once trained 1 more."""
    repo = copy_repo(trained_repo, tmp_path / "repo")
    set_iterations(repo, 1)
    state = (repo / "models/current/state.json").read_text()
    result = run(["rlhf", "train"], repo)
    assert result.stderr.strip().splitlines() == [
        "train: models/current already holds iteration 1 (train.iterations: 1); nothing to do "
        "(`rlhf train -n N` trains N more)"]
    assert "$ dvc" not in result.stdout + result.stderr
    assert (repo / "models/current/state.json").read_text() == state and iterations(repo) == [0, 1]


def stage_running(pid, name):
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(part.endswith(f"stages/{name}.py") for part in child.cmdline()):
                return True
        except psutil.NoSuchProcess:
            pass
    return False


def test_ctrl_c_in_a_stage_says_one_line_and_train_continues_to_train_iterations(trained_repo, tmp_path):
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) while the reward stage of
    iteration 2 runs: one line, no traceback, no DVC error. `rlhf train` then finishes iteration 2 without rerunning
    the rollout that had finished, and the history holds each iteration once."""
    repo = copy_repo(trained_repo, tmp_path / "repo")
    set_iterations(repo, 2)
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(["rlhf", "train"], cwd=repo, env=env, stdout=stdout, stderr=stderr,
                                start_new_session=True)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline and not stage_running(proc.pid, "reward"):
            time.sleep(0.02)
        assert proc.poll() is None, "train ended before the reward stage"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
    lines = err.read_text().strip().splitlines()
    assert proc.returncode == 130, lines
    assert "Running stage 'reward'" in out.read_text()
    assert lines[-1] == ("stopped in iteration 2 (stage 'reward'): nothing is lost (iteration 1 is kept, finished "
                         "stages are in DVC's cache); continue with: rlhf train")
    assert not [line for line in lines + out.read_text().splitlines()
                if "Traceback" in line or "KeyboardInterrupt" in line or line.startswith("ERROR")], lines
    assert [line for line in lines if line.startswith("$ dvc")][-1] == "$ dvc repro"  # it stopped in the repro

    resumed = run(["rlhf", "train"], repo)
    assert "rollout" not in ran_stages(resumed.stdout) and "reward" in ran_stages(resumed.stdout)
    assert iterations(repo) == [0, 1, 2] and iterations(repo, "train_history.csv") == [1, 2]
    assert "nothing to do" in run(["rlhf", "train"], repo).stderr
    assert iterations(repo) == [0, 1, 2]


@pytest.mark.parametrize("argv,again", [
    (["train"], "rlhf train"),
    (["train", "-n", "3", "--commit", "-p", "other.yaml"], "rlhf train -p other.yaml -n 2 --commit"),
])
def test_the_interrupted_line_names_the_command_that_continues(tmp_path, monkeypatch, argv, again):
    """With -n N the command that continues asks for the iterations left, not N again."""
    from typer.testing import CliRunner

    from rlhf import cli, project

    (tmp_path / "other.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    (tmp_path / "params.yaml").write_bytes((ROOT / "params.yaml").read_bytes())
    monkeypatch.chdir(tmp_path)

    def stopped(*args):
        raise project.Interrupted("stopped in iteration 2: nothing is lost", done=1)

    monkeypatch.setattr(project, "train", stopped)
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == [f"stopped in iteration 2: nothing is lost; continue with: {again}"]
