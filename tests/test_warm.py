"""Warm start (rlhf/runtime/warm_start.py): stages forked from a process that imported torch once behave like direct runs."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import yaml

from conftest import BIN, ROOT, copy_repo, run, stage


def set_warm(repo, on: bool) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["runtime"]["warm_start"] = on
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_warm_and_direct_runs_write_the_same_artifacts(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    run(stage("sample"), repo)
    outputs = {"rollout": "rollout.parquet", "reward": "scores.parquet", "reference": "reference.parquet",
               "advantages": "advantages.parquet"}
    digests = {}
    for warm in (False, True):
        set_warm(repo, warm)
        usage = tmp_path / f"usage-{warm}.json"
        for name, out in outputs.items():
            usage.unlink(missing_ok=True)
            run(["env", f"RLHF_WARM_RUSAGE={usage}", *stage(name)], repo)
            digests[warm, name] = sha(repo / "data" / "iteration" / out)
        # the rusage file is written only when a worker of the warm process ran the stage
        assert usage.exists() == warm
        if warm:
            assert json.loads(usage.read_text())["maxrss_kib"] > 50_000  # the worker imported torch (via the fork)
    for name in outputs:
        assert digests[True, name] == digests[False, name], name
    assert "pid " in run(["rlhf", "warm", "status"], repo).stdout


def test_warm_worker_reports_errors_and_exit_code_like_a_direct_run(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    (repo / "data" / "iteration" / "rollout.parquet").unlink(missing_ok=True)
    results = {}
    for warm in (False, True):
        set_warm(repo, warm)
        results[warm] = run(stage("reward"), repo, check=False)
    assert results[True].returncode == results[False].returncode == 2
    assert results[True].stderr.strip().splitlines()[-1] == results[False].stderr.strip().splitlines()[-1]
    assert "error:" in results[True].stderr


def _worker_of(client: subprocess.Popen, repo) -> psutil.Process | None:
    """The forked worker running the client's stage: an `rlhf.runtime.warm_start` process whose directory is the project."""
    for proc in psutil.process_iter(["cmdline", "cwd", "pid"]):
        try:
            if proc.info["pid"] != client.pid and "rlhf.runtime.warm_start" in " ".join(proc.info["cmdline"] or []) \
                    and proc.info["cwd"] == str(repo):
                return proc
        except psutil.Error:
            continue
    return None


def _start_and_find_worker(repo):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    client = subprocess.Popen(stage("update"), cwd=repo, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    worker = None
    while worker is None and client.poll() is None and time.time() < deadline:
        worker = _worker_of(client, repo)
        time.sleep(0.01)
    assert worker is not None, "no worker process appeared"
    return client, worker


def test_killing_the_command_kills_its_worker(tmp_path, trained_repo):
    """`dvc repro` interrupted by SIGKILL must not leave the stage running in the warm process."""
    repo = copy_repo(trained_repo, tmp_path / "repo")
    set_warm(repo, True)
    run(["rlhf", "warm", "status"], repo)
    client, worker = _start_and_find_worker(repo)
    client.kill()
    client.wait()
    worker.wait(timeout=5)  # raises psutil.TimeoutExpired if the worker outlived its command
    run(stage("update"), repo)  # and the stage still runs to the end afterwards
    assert (repo / "models" / "next" / "state.json").exists()


def test_sigterm_is_forwarded_and_becomes_the_exit_code(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    set_warm(repo, True)
    client, worker = _start_and_find_worker(repo)
    time.sleep(0.3)  # the command installs its forwarding handlers right after the worker exists
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    worker.wait(timeout=5)


def test_key_changes_with_the_code_and_the_environment(tmp_path, monkeypatch):
    from rlhf.runtime import warm_start as warm

    copy = tmp_path / "rlhf"
    shutil.copytree(ROOT / "rlhf", copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(warm, "package_dir", lambda: copy)
    k0 = warm.key()
    assert warm.key() == k0
    (copy / "models" / "sampling.py").write_text((copy / "models" / "sampling.py").read_text() + "\n# edited\n")
    k1 = warm.key()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    k2 = warm.key()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")  # read by oneDNN once, at import: another kernel set
    k3 = warm.key()
    monkeypatch.setenv("SOME_UNRELATED_VARIABLE", "x")
    assert len({k0, k1, k2, k3}) == 4 and warm.key() == k3


PROBE_STAGE = '''"""a warm stage that says which version of rlhf/_mark.py it sees and whether a warm worker runs it"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params):
    from rlhf import _mark

    print(f"mark={_mark.MARK} worker={os.environ.get('RLHF_WARM_WORKER', '-')}")


if __name__ == "__main__":
    run_stage(main)
'''
# Appended to the first rlhf module the warm process imports: while it imports, the package changes (rlhf/_mark.py
# edited, imported, then reverted to the same bytes, as an editor's undo within seconds would).
EDIT_WHILE_IMPORTING = '''
from pathlib import Path as _Path

_file = _Path(__file__).resolve().parents[1] / "_mark.py"
_file.write_text('MARK = "edited"\\n')
from rlhf import _mark  # noqa: E402,F401
_file.write_text('MARK = "clean"\\n')
'''


def test_a_package_changed_while_the_warm_process_imports_is_never_served(tmp_path):
    """The command hashed the package with MARK = "clean"; the warm process loaded "edited" and the files read
    "clean" again once its imports were done. It must not serve: the stage runs in its own process and sees
    "clean"."""
    from rlhf.runtime import warm_start

    first = warm_start.PRELOAD[[m.startswith("rlhf.") for m in warm_start.PRELOAD].index(True)]
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "rlhf", ws / "rlhf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", ws / "params.yaml")  # runtime.warm_start: true
    (ws / "rlhf" / "_mark.py").write_text('MARK = "clean"\n')
    module = ws / Path(*first.split(".")).with_suffix(".py")
    module.write_text(module.read_text() + EDIT_WHILE_IMPORTING)
    (ws / "stages").mkdir()
    (ws / "stages" / "probe.py").write_text(PROBE_STAGE)
    result = run(["python", "stages/probe.py"], ws)
    assert "mark=clean worker=-" in result.stdout, result.stdout + result.stderr
    assert "the rlhf package changed while the warm process was starting" in result.stderr
    assert (ws / "rlhf" / "_mark.py").read_text() == 'MARK = "clean"\n'
