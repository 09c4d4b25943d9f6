"""Nothing lost across machines: `rlhf train --commit --push` pushes each iteration to a local-folder remote as it
goes; a clone elsewhere pulls every tagged iteration back with nothing to rerun; `dvc gc -T -w` keeps every tagged
iteration."""

import json

import pytest

from conftest import make_project, ran_stages, run, tiny_params


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, tiny_policy, tiny_reward):
    base = tmp_path_factory.mktemp("remote")
    repo = make_project(base / "repo", tiny_params(tiny_policy, tiny_reward))
    # --local (untracked .dvc/config.local), as a user would point the shipped remote elsewhere
    run(["dvc", "remote", "add", "--local", "-f", "-d", "local", str(base / "rlhf-dvc-storage")], repo)
    run(["rlhf", "train", "--iterations", "1", "--commit", "--push"], repo)
    assert (base / "rlhf-dvc-storage").is_dir()
    assert "are in sync" in run(["dvc", "status", "--cloud"], repo).stdout  # the workspace's state is all pushed
    return base, repo


def state(path):
    return json.loads(path.read_text())["iteration"]


def test_fresh_clone_pull_restores_every_tag_and_reruns_nothing(pushed):
    base, repo = pushed
    clone = base / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], base)
    # --local (untracked .dvc/config.local): the setting survives checking out older tags
    run(["dvc", "remote", "add", "--local", "-f", "-d", "local", str(base / "rlhf-dvc-storage")], clone)
    run(["git", "checkout", "-q", "iter-1"], clone)
    run(["dvc", "pull"], clone)
    assert state(clone / "models/next/state.json") == 1 and state(clone / "models/current/state.json") == 0
    assert ran_stages(run(["dvc", "repro"], clone).stdout) == []
    assert "up to date" in run(["dvc", "status"], clone).stdout
    run(["git", "checkout", "-q", "iter-0"], clone)
    run(["dvc", "pull", "models/current.dvc"], clone)
    assert state(clone / "models/current/state.json") == 0


def test_gc_keeping_tags_keeps_every_iteration(pushed):
    _, repo = pushed
    run(["dvc", "gc", "--all-tags", "--workspace", "--force"], repo)
    for tag, target, folder, expected in (("iter-1", [], "models/next", 1),
                                          ("iter-0", ["models/current.dvc"], "models/current", 0)):
        run(["git", "checkout", "-q", tag], repo)
        run(["dvc", "checkout", "--force", *target], repo)  # from the local cache only
        assert state(repo / folder / "state.json") == expected
