"""End to end in a temporary git + DVC repo with tiny Qwen3 models: train, rerun rules, metrics."""

import csv
import json

import pytest
import yaml

from conftest import make_project, ran_stages, run, tiny_params


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_policy, tiny_reward):
    repo = make_project(tmp_path_factory.mktemp("pipeline") / "repo", tiny_params(tiny_policy, tiny_reward))
    run(["rlhf", "train", "--iterations", "1", "--commit"], repo)
    return repo


def set_param(repo, key, value):
    p = yaml.safe_load((repo / "params.yaml").read_text())
    section, name = key.split(".")
    p[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def test_train_writes_state_metrics_and_history(project):
    state = json.loads((project / "models/current/state.json").read_text())
    assert state["iteration"] == 1 and state["global_step"] == 4  # 2 epochs × 2 minibatches
    for f in ("prepare.json", "rollout.json", "objective.json", "update.json", "eval.json", "samples.md",
              "eval_initial.json", "history.csv", "train/plots/metrics/loss/policy.tsv"):
        assert (project / "metrics" / f).exists(), f
    rows = list(csv.DictReader((project / "metrics/history.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1"]
    assert (project / "models/current/policy/adapter_model.safetensors").exists()
    assert (project / "models/current/optimizer/policy.safetensors").exists()
    tags = run(["git", "tag"], project).stdout.split()
    assert {"iter-0", "iter-1"} <= set(tags)


def test_first_minibatch_ratio_is_one(project):
    update = json.loads((project / "metrics/update.json").read_text())
    assert update["first_minibatch/ratio_max_abs_dev"] <= 1e-5
    assert update["first_minibatch/approxkl"] < 1e-6
    assert update["policy/approxkl"] > 0  # later minibatches do move the policy


def test_rerun_rules(project):
    first = run(["dvc", "repro"], project)  # iteration 2 from the advanced state
    assert ran_stages(first.stdout) == ["sample", "rollout", "reward", "reference", "advantages", "update", "evaluate"]
    assert ran_stages(run(["dvc", "repro"], project).stdout) == []
    assert "up to date" in run(["dvc", "status"], project).stdout

    set_param(project, "gae.lam", 0.9)
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["advantages", "update", "evaluate"]

    set_param(project, "reward_model.max_length", 40)  # truncation changes the scores
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["reward", "advantages", "update", "evaluate"]

    set_param(project, "ppo.clip_eps", 0.1)
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["update"]  # evaluate: same models/next? no
