"""End to end in a temporary git + DVC repo with tiny Qwen3 models: train, rerun rules, metrics."""

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import copy_repo, ran_stages, run, stage


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_repo):
    return copy_repo(trained_repo, tmp_path_factory.mktemp("pipeline") / "repo")


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
    for name in ("history.csv", "train_history.csv"):  # the tag's own history ends at its iteration
        tagged = run(["git", "show", f"iter-1:metrics/{name}"], project).stdout
        assert [r["iteration"] for r in csv.DictReader(tagged.splitlines())][-1] == "1", name


def test_first_minibatch_ratio_is_one(project):
    update = json.loads((project / "metrics/update.json").read_text())
    assert update["first_minibatch/ratio_max_abs_dev"] <= 1e-5
    assert update["first_minibatch/approxkl"] < 1e-6
    assert update["policy/approxkl"] > 0  # later minibatches do move the policy


def test_step_curves_hold_every_optimizer_step_and_agree_with_the_summaries(project):
    """The per-step TSVs `dvc plots` draws: one row per optimizer step, the last row = train/metrics.json, and
    their mean = update.json's value (its per-iteration summary), so plots, metrics and history tell one story."""
    folder = project / "metrics/train/plots/metrics"
    last = json.loads((project / "metrics/train/metrics.json").read_text())
    update = json.loads((project / "metrics/update.json").read_text())
    curves = sorted(folder.rglob("*.tsv"))
    assert {"loss/policy", "loss/value", "policy/approxkl", "policy/clipfrac"} <= {
        str(p.relative_to(folder).with_suffix("")) for p in curves}
    for path in curves:
        key = str(path.relative_to(folder).with_suffix(""))
        header, *rows = list(csv.reader(path.open(), delimiter="\t"))
        assert header == ["step", key.rsplit("/", 1)[-1]], path
        assert [int(r[0]) for r in rows] == list(range(update["steps"])), path
        values = [float(r[1]) for r in rows]
        assert values[-1] == pytest.approx(last[key], rel=1e-12, abs=0), key
        if key != "policy/ratio_max_abs_dev":  # summarised as the max, checked below
            assert sum(values) / len(values) == pytest.approx(update[key], rel=1e-9, abs=1e-15), key
    ratio_dev = [float(r[1]) for r in list(csv.reader((folder / "policy/ratio_max_abs_dev.tsv").open(),
                                                       delimiter="\t"))[1:]]
    assert update["policy/ratio_max_abs_dev"] == pytest.approx(max(ratio_dev))
    assert update["first_minibatch/ratio_max_abs_dev"] == pytest.approx(ratio_dev[0])


def test_rerun_rules(project):
    first = run(["dvc", "repro"], project)  # iteration 2 from the advanced state
    assert ran_stages(first.stdout) == ["sample", "rollout", "reward", "reference", "advantages", "update", "evaluate"]
    assert ran_stages(run(["dvc", "repro"], project).stdout) == []
    assert "up to date" in run(["dvc", "status"], project).stdout

    lam = yaml.safe_load((project / "params.yaml").read_text())["gae"]["lam"]
    set_param(project, "gae.lam", 0.9)
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["advantages", "update", "evaluate"]
    eval_at_09 = (project / "metrics/eval.json").read_text()
    set_param(project, "gae.lam", lam)  # reverting restores every stage's outputs from the run-cache, evaluate too
    reverted = run(["dvc", "repro"], project).stdout
    assert ran_stages(reverted) == [], reverted
    set_param(project, "gae.lam", 0.9)
    assert ran_stages(run(["dvc", "repro"], project).stdout) == []
    assert (project / "metrics/eval.json").read_text() == eval_at_09

    set_param(project, "reward_model.max_length", 40)  # truncation changes the scores
    assert ran_stages(run(["dvc", "repro"], project).stdout) == ["reward", "advantages", "update", "evaluate"]

    run(["dvc", "metrics", "diff", "iter-1"], project)
    assert "eval/reward_mean" in run(["dvc", "metrics", "show"], project).stdout


def test_rollout_is_deterministic(project):
    path = project / "data/iteration/rollout.parquet"
    before = path.read_bytes()
    run(["dvc", "repro", "-f", "-s", "rollout"], project)
    assert path.read_bytes() == before


def test_export_adapter_and_merged_give_the_same_logits(project):
    import torch

    from rlhf.reports.export import max_logit_difference
    from rlhf.config.params import load_params

    run(["rlhf", "export", "--out", "models/export"], project)
    assert (project / "models/export/adapter/adapter_model.safetensors").exists()
    assert (project / "models/export/merged/model.safetensors").exists()
    params = load_params(project / "params.yaml")
    import os

    cwd = os.getcwd()
    os.chdir(project)
    try:
        ids = torch.tensor([[9707, 1879, 11, 1879, 13]])
        diff = max_logit_difference(params, project / "models/current", project / "models/export", ids)
        from rlhf.models.checkpoint import load_actors

        actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
        with torch.no_grad():
            policy = actors.model.get_base_model()(input_ids=ids).logits  # the trained policy itself
    finally:
        os.chdir(cwd)
    assert diff < 1e-4
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    exported = load_file(project / "models/export/adapter/adapter_model.safetensors")
    trained = load_file(project / "models/current/policy/adapter_model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(project / "models/export/merged", dtype=torch.float32)
        assert (merged(input_ids=ids).logits - policy).abs().max() < 1e-4


def test_nan_advantage_aborts_update_and_writes_nothing(project):
    import math

    from rlhf.artifacts.schema import read_artifact, write_artifact

    path = project / "data/iteration/advantages.parquet"
    df = read_artifact(path, "advantages")
    df.at[0, "advantages"] = [math.nan] + list(df.at[0, "advantages"])[1:]
    write_artifact(df, "advantages", path)
    before = (project / "models/next/state.json").stat().st_mtime_ns
    result = run(stage("update"), project, check=False)
    assert result.returncode == 2
    assert "non-finite advantages" in result.stderr.strip().splitlines()[-1]
    assert (project / "models/next/state.json").stat().st_mtime_ns == before


def test_nan_reward_stops_advantages_and_writes_nothing(project):
    import math

    import pandas as pd

    from rlhf.artifacts.schema import write_artifact

    scores = project / "data/iteration/scores.parquet"
    out = project / "data/iteration/advantages.parquet"
    before = out.read_bytes()
    write_artifact(pd.DataFrame({"prompt_id": pd.read_parquet(scores)["prompt_id"],
                                 "score": [math.nan] + [0.5] * 3}), "scores", scores)
    result = run(stage("advantages"), project, check=False)
    assert result.returncode == 2 and "non-finite reward" in result.stderr.strip().splitlines()[-1]
    assert out.read_bytes() == before


def test_every_metric_a_stage_writes_is_in_its_files_glossary_section(project):
    """docs/metrics.md groups the glossary by file: each key a stage writes is named in its own file's section."""
    glossary = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    for name in ("objective", "update", "rollout", "eval", "prepare", "sft"):
        start = glossary.index(f"## `metrics/{name}.json`")
        section = glossary[start:glossary.find("\n## ", start + 1)]
        names = set(re.findall(r"`([^`]+)`", section))
        prefixes = [n[:-1] for n in names if n.endswith("*")]  # `skipped_*`
        for key in json.loads((project / "metrics" / f"{name}.json").read_text()):
            base = re.sub(r"_ci_(low|high|mc)$", "", key)  # a comparison's interval: documented with the comparison
            assert base in names or any(key.startswith(p) for p in prefixes), f"{name}.json: {key}"