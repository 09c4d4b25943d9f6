"""A stage runs the code of the workspace it is in: the `rlhf` package next to its `stages/`, never the folder the
package was installed from (PYTHONPATH here, as `pip install -e` does, points at this checkout). A queued `dvc exp
run` runs in a copy of the workspace, and its dvc.lock records the copy's code: that code must be what ran."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from conftest import BIN, ROOT, copy_repo, run

MARK = 'import sys as _sys\nprint(f"rlhf from: {__file__}", file=_sys.stderr, flush=True)\n'


def workspace_copy(dest: Path) -> Path:
    """The stage scripts and the package in another folder, the package saying where it is imported from."""
    for code in ("stages", "rlhf"):
        shutil.copytree(ROOT / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", dest / "params.yaml")
    init = dest / "rlhf" / "__init__.py"
    init.write_text(init.read_text() + MARK)
    return dest


def imported_from(stderr: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in stderr.splitlines() if line.startswith("rlhf from: ")]


def test_every_stage_script_run_from_a_copy_imports_the_copys_package(tmp_path):
    ws = workspace_copy(tmp_path / "ws")
    scripts = sorted(p.name for p in (ws / "stages").glob("*.py"))
    assert len(scripts) == 10
    for script in scripts:
        result = run(["python", f"stages/{script}", "--help"], ws)  # as dvc.yaml's commands run them
        assert imported_from(result.stderr) == [str(ws / "rlhf" / "__init__.py")], (script, result.stderr)


def test_under_torchrun_each_rank_imports_the_copys_package(tmp_path):
    """dvc.yaml runs the data-parallel stages through runtime.launcher, e.g. torchrun: every rank is a fresh Python
    running the script by its path."""
    ws = workspace_copy(tmp_path / "ws")
    result = run(["torchrun", "--standalone", "--nproc-per-node", "2", "stages/reward.py", "--help"], ws)
    assert imported_from(result.stderr) == [str(ws / "rlhf" / "__init__.py")] * 2, result.stderr


def test_a_stage_refuses_in_one_line_to_run_another_folders_package(tmp_path):
    """A workspace without its own rlhf/ (only its scripts): the import falls through to the installed package, which
    is not the code of this workspace."""
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "stages", ws / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", ws / "params.yaml")
    result = run(["python", "stages/sample.py", "--help"], ws, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stages/sample.py would run the rlhf package in "), lines
    assert str(ROOT / "rlhf") in lines[0] and str(ws) in lines[0]


def _warm_processes_in(folder: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if "rlhf.runtime.warm_start" in " ".join(proc.info["cmdline"] or []) and proc.info["cwd"] == str(folder):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_warm_stage_from_a_copy_runs_in_a_worker_of_the_copys_package(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    usage = tmp_path / "usage.json"
    run(["env", f"RLHF_WARM_RUSAGE={usage}", "python", "stages/advantages.py"], repo)
    assert usage.exists()  # it ran in a worker of a warm process (whose check would refuse another package)
    assert _warm_processes_in(repo), "no warm process was started from the copy's package"


# ---- a queued experiment ------------------------------------------------------------------------------------------

EDIT = ('    return out, metrics\n', '    metrics["experiment_mark"] = 1.0  # the queued edit\n    return out, metrics\n')


def _wait_for_queue(repo: Path, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(1)
    raise AssertionError(f"the queue did not finish in {timeout} s:\n{status}")


def test_a_queued_experiment_runs_the_code_it_was_queued_with(tmp_path, trained_repo):
    """Edit the package, queue an experiment, revert the edit, run the queue: the experiment's output carries the
    edit's mark, and its commit records the edited file."""
    repo = copy_repo(trained_repo, tmp_path / "repo")
    code = repo / "rlhf" / "training" / "advantages.py"
    original = code.read_text()
    assert original.count(EDIT[0]) == 1
    code.write_text(original.replace(*EDIT))
    run(["dvc", "exp", "run", "--queue", "-s", "advantages", "--name", "marked"], repo)
    code.write_text(original)  # the workspace is back to the committed code before the queue starts
    run(["dvc", "queue", "start", "-j", "1"], repo)
    status = _wait_for_queue(repo)
    assert "Success" in status, status + run(["dvc", "queue", "logs", "marked"], repo, check=False).stdout
    ref = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo).stdout.split()
    assert len(ref) == 1, ref
    recorded = run(["git", "show", f"{ref[0]}:rlhf/training/advantages.py"], repo).stdout
    assert "experiment_mark" in recorded  # what the experiment's commit (and dvc.lock) says ran
    objective = json.loads(run(["git", "show", f"{ref[0]}:metrics/objective.json"], repo).stdout)
    assert objective.get("experiment_mark") == 1.0, "the experiment ran the workspace's reverted code"
    assert "experiment_mark" not in code.read_text()
