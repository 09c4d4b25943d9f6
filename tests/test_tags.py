"""`rlhf train --commit` tags iterations; an existing tag is moved only with --force, checked before any work."""

import json
import subprocess

import pytest
import yaml

from conftest import full_params, run
from rlhf import project
from rlhf.config.params import parse_params
from rlhf.errors import StateError


def git(repo, *args) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git repo with one commit and params.yaml; the working directory of the test."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(full_params(), sort_keys=False))
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "test@example.com")
    git(tmp_path, "config", "user.name", "test")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "project")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def params():
    return parse_params(full_params())


def new_change(repo, name="metrics/x.json"):
    (repo / name).parent.mkdir(parents=True, exist_ok=True)
    (repo / name).write_text(json.dumps({"v": len(git(repo, "log", "--oneline").splitlines())}))


def test_planned_tags_start_at_zero_without_a_state_and_after_the_current_iteration_with_one(repo):
    assert project.planned_tags(params(), 2, "iter-") == ["iter-0", "iter-1", "iter-2"]
    state = repo / "models" / "current"
    state.mkdir(parents=True)
    (state / "state.json").write_text(json.dumps({"iteration": 4}))
    assert project.planned_tags(params(), 2, "run-") == ["run-5", "run-6"]


def test_commit_refuses_to_move_an_existing_tag(repo):
    old = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "iter-1")
    new_change(repo)
    with pytest.raises(StateError, match=rf"tag iter-1 already exists \(iter-1 is on {old[:12]}\); --force"):
        project.commit(params(), "PPO iteration 1", "iter-1")
    assert git(repo, "rev-parse", "HEAD") == old  # refused before committing
    assert git(repo, "rev-parse", "iter-1^{commit}") == old


def test_commit_with_force_moves_the_tag(repo):
    git(repo, "tag", "iter-1")
    new_change(repo)
    project.commit(params(), "PPO iteration 1", "iter-1", force=True)
    head = git(repo, "rev-parse", "HEAD")
    assert git(repo, "log", "-1", "--format=%s") == "PPO iteration 1"
    assert git(repo, "rev-parse", "iter-1^{commit}") == head


def test_commit_writes_a_new_tag_without_force(repo):
    new_change(repo)
    project.commit(params(), "PPO iteration 0", "iter-0")
    assert git(repo, "rev-parse", "iter-0^{commit}") == git(repo, "rev-parse", "HEAD")


def test_annotated_tags_count_as_existing(repo):
    git(repo, "tag", "-a", "iter-2", "-m", "by hand")
    with pytest.raises(StateError, match="tag iter-2 already exists"):
        project.check_tags_free(["iter-1", "iter-2"], force=False)
    project.check_tags_free(["iter-1", "iter-2"], force=True)


def test_train_checks_every_planned_tag_before_any_work(repo, monkeypatch):
    calls = []
    monkeypatch.setattr(project, "dvc", lambda *args: calls.append(args))
    git(repo, "tag", "iter-2")
    git(repo, "tag", "iter-3")
    with pytest.raises(StateError, match=r"^tags iter-2, iter-3 already exist"):
        project.train(params(), 3, commit_each=True)
    assert calls == []  # not even `dvc repro prepare`
    project.check_tags_free(project.planned_tags(params(), 1, "iter-"), force=False)  # iter-0, iter-1 are free


def test_train_without_commit_ignores_tags(repo, monkeypatch):
    calls = []

    def first_dvc_call_stops(*args):
        calls.append(args)
        raise StateError("stop")

    monkeypatch.setattr(project, "dvc", first_dvc_call_stops)
    git(repo, "tag", "iter-0")
    with pytest.raises(StateError, match="stop"):
        project.train(params(), 1, commit_each=False)
    assert calls == [("repro", "prepare", "reward_model", "sft")]


def test_cli_train_commit_refuses_in_one_line(repo):
    git(repo, "tag", "iter-0")
    result = run(["rlhf", "train", "--commit", "--iterations", "1"], repo, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: tag iter-0 already exists (iter-0 is on {git(repo, 'rev-parse', 'HEAD')[:12]}); --force moves "
        "existing tags, --tag-prefix gives new names"]
    assert "$ dvc" not in result.stdout + result.stderr
    assert "--force" in run(["rlhf", "train", "--help"], repo).stdout


def test_cli_train_iterations_zero_means_none_and_unset_means_the_params_default(repo, monkeypatch):
    """`-n 0` sets up models, prompts and iteration 0 only; it once fell through to train.iterations."""
    from typer.testing import CliRunner

    from rlhf.cli import app

    asked = []
    monkeypatch.setattr(project, "train", lambda p, n, *rest: asked.append(n))
    for argv in (["train", "-n", "0"], ["train"], ["train", "--iterations", "2"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
    assert asked == [0, None, 2]  # None: up to train.iterations (project.train counts from the state)
    assert CliRunner().invoke(app, ["train", "-n", "-1"]).exit_code == 2  # typer's usage error
    assert asked == [0, None, 2]
