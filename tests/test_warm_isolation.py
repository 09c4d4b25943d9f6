"""The suite stops only its own warm processes (RLHF_WARM_DIR of the session, tests/conftest.py): a warm process
serving a `dvc repro` elsewhere, in another socket folder, is left running."""

import os
from pathlib import Path

from conftest import copy_repo, run, stage
from rlhf.runtime import warm_start


def warm_pids(folder: str) -> set[int]:
    saved = os.environ[warm_start.DIR_ENV]
    os.environ[warm_start.DIR_ENV] = folder
    try:
        return {pid for pid, _ in warm_start.running()}
    finally:
        os.environ[warm_start.DIR_ENV] = saved


def is_warm_process(pid: int) -> bool:
    try:
        return b"rlhf.runtime.warm_start" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_warm_process_outside_the_suites_folder_survives_the_suites_stop_all(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    suite_dir, outside_dir = os.environ[warm_start.DIR_ENV], str(tmp_path / "users-own-warm")
    # a user's warm process (its own folder, a longer idle time) and one of the suite's
    run(["env", f"{warm_start.DIR_ENV}={outside_dir}", f"{warm_start.IDLE_ENV}=120", *stage("advantages")], repo)
    run(stage("advantages"), repo)
    outside, suite = warm_pids(outside_dir), warm_pids(suite_dir)
    assert len(outside) == 1 and suite and not outside & suite
    try:
        stopped = warm_start.stop_all()  # exactly as the suite's session fixture calls it
        assert stopped == len(suite) and not any(is_warm_process(pid) for pid in suite)
        assert all(is_warm_process(pid) for pid in outside)
    finally:
        os.environ[warm_start.DIR_ENV] = outside_dir
        try:
            assert warm_start.stop_all() == 1
        finally:
            os.environ[warm_start.DIR_ENV] = suite_dir
    assert not any(is_warm_process(pid) for pid in outside)
