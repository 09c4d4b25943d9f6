"""Nothing lost across machines: push to the local-folder remote, clone elsewhere, pull, and every tagged
iteration comes back with nothing to rerun; `dvc gc -T -w` keeps every tagged iteration."""

import json
import shutil

import pytest

from conftest import ran_stages, run


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, trained_repo):
    base = tmp_path_factory.mktemp("remote")
    repo = base / "repo"
    shutil.copytree(trained_repo, repo, symlinks=True)
    # The shipped .dvc/config points the default remote at ../rlhf-dvc-storage, a sibling of the checkout.
    run(["dvc", "remote", "add", "-f", "-d", "local", "../rlhf-dvc-storage"], repo)
    run(["git", "commit", "-qam", "remote"], repo)
    # Push every tagged state from its own checkout (what `rlhf train --commit --push` does as it goes):
    # `dvc push --all-commits` (dvc 3.67) skipped the older versions of the dvc-added models/current here.
    run(["dvc", "remote", "add", "--local", "-f", "-d", "local", str(base / "rlhf-dvc-storage")], repo)
    for tag in ("iter-0", "iter-1"):
        run(["git", "checkout", "-q", tag], repo)
        run(["dvc", "checkout", "--force", "models/current.dvc"], repo)
        run(["dvc", "push"], repo, check=False)  # iter-0 has no models/next yet: push what exists
        run(["dvc", "push", "models/current.dvc"], repo)
    run(["git", "checkout", "-q", "-"], repo)
    assert (base / "rlhf-dvc-storage").is_dir()
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
