"""The evaluate stage's comparisons with earlier iterations: where they come from (metrics/samples/iter-N.jsonl),
where they go (eval.json, history.csv, the summary `rlhf train` prints) and what happens when a table is missing."""

import csv
import json

import pandas as pd
import pytest

from conftest import copy_repo, full_params, run, stage
from rlhf.errors import ArtifactError

INTERVALS = ("reward_delta_vs_initial", "reward_delta_vs_previous", "win_rate_vs_initial")


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_repo):
    return copy_repo(trained_repo, tmp_path_factory.mktemp("evalstats") / "repo")


def test_eval_json_has_ordered_intervals_and_text_statistics(project):
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["iteration"] == 1
    for name in INTERVALS:
        low, point, high = (metrics[f"eval/{name}{end}"] for end in ("_ci_low", "", "_ci_high"))
        assert low <= point <= high, name
    assert 0 <= metrics["eval/win_rate_vs_initial_ci_low"] <= metrics["eval/win_rate_vs_initial_ci_high"] <= 1
    assert 0 <= metrics["eval/repeated_3gram_fraction"] <= 1
    assert metrics["eval/distinct_2"] is None or 0 < metrics["eval/distinct_2"] <= 1
    # iteration 1's previous iteration is iteration 0, so both comparisons are the same paired differences
    assert metrics["eval/reward_delta_vs_previous"] == metrics["eval/reward_delta_vs_initial"]
    now = pd.read_json(project / "metrics/samples.jsonl", lines=True)
    before = pd.read_json(project / "metrics/samples/iter-0.jsonl", lines=True).set_index("prompt_id")
    delta = (now.set_index("prompt_id")["reward"] - before["reward"]).mean()
    assert metrics["eval/reward_delta_vs_initial"] == pytest.approx(delta, abs=1e-9)


def test_history_has_the_new_columns_and_iteration_0_compares_with_itself(project):
    rows = list(csv.DictReader((project / "metrics/history.csv").open()))
    assert [r["iteration"] for r in rows] == ["0", "1"]
    first, second = rows
    for key in ("eval/repeated_3gram_fraction", "eval/distinct_2", *(f"eval/{n}{e}" for n in INTERVALS
                                                                     for e in ("", "_ci_low", "_ci_high"))):
        assert key in first, key
    assert [float(first[f"eval/win_rate_vs_initial{e}"]) for e in ("", "_ci_low", "_ci_high")] == [0.5] * 3
    assert float(first["eval/reward_delta_vs_initial"]) == 0.0
    assert first["eval/reward_delta_vs_previous"] == ""  # iteration 0 has no previous iteration
    assert float(second["eval/win_rate_vs_initial_ci_low"]) <= float(second["eval/win_rate_vs_initial"])


def test_summary_prints_win_rate_and_change_with_intervals(project, monkeypatch, capsys):
    from rlhf.config.params import load_params
    from rlhf.project import print_summary

    monkeypatch.chdir(project)
    print_summary(load_params("params.yaml"))
    out = capsys.readouterr().out
    assert "win rate vs it. 0" in out and "rep. 3-grams" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("1 "))
    assert line.count("[") == 2  # Δ reward and win rate, each with its interval
    assert "0.50 [0.50, 0.50]" in next(x for x in out.splitlines() if x.strip().startswith("0 "))


def test_without_baseline_tables_the_comparisons_are_null(project, tmp_path):
    repo = copy_repo(project, tmp_path / "repo")
    run(["rm", "-rf", "metrics/samples"], repo)
    run(["rlhf", "init", "--force", "--no-baseline", "--no-track"], repo)
    assert (repo / "metrics/samples").is_dir()  # evaluate's dvc.yaml dep exists even without a baseline
    result = run(stage("evaluate"), repo)
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert all(metrics[f"eval/{n}{e}"] is None for n in INTERVALS for e in ("", "_ci_low", "_ci_high"))
    assert metrics["eval/repeated_3gram_fraction"] is not None
    assert "no iteration-0 held-out table" in result.stderr + result.stdout


def _table(rewards: dict) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": list(rewards), "reward": list(rewards.values())})


def _compare(tmp_path, now: dict, archived: dict, iteration: int = 2) -> dict:
    from rlhf.config.params import parse_params
    from rlhf.evaluation import comparison_metrics

    tmp_path.mkdir(exist_ok=True)
    for it, rewards in archived.items():
        _table(rewards).to_json(tmp_path / f"iter-{it}.jsonl", orient="records", lines=True)
    cfg = parse_params(full_params()).eval
    return comparison_metrics(_table(now), iteration, tmp_path, cfg, seed=0)


def test_comparisons_pair_by_prompt_id_not_by_row(tmp_path):
    from rlhf.config.params import parse_params
    from rlhf.reports import statistics as st

    now = {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.4}
    initial = {"c": 0.8, "a": 0.5, "d": 0.2, "b": 0.3}
    got = _compare(tmp_path, now, {0: initial, 1: {"b": 0.1, "d": 0.4, "c": 0.9, "a": 0.2}})
    assert got["eval/reward_delta_vs_initial"] == pytest.approx((0.0 - 0.2 + 0.1 + 0.2) / 4)
    assert got["eval/reward_delta_vs_previous"] == pytest.approx(0.3 / 4)
    assert got["eval/win_rate_vs_initial"] == pytest.approx((0.5 + 0 + 1 + 1) / 4)  # 0.375 if the sides were swapped
    cfg = parse_params(full_params()).eval
    ids = list(now)
    for name, per_prompt in (("reward_delta_vs_initial", [now[k] - initial[k] for k in ids]),
                             ("win_rate_vs_initial", st.wins([now[k] for k in ids], [initial[k] for k in ids]))):
        interval = tuple(got[f"eval/{name}{end}"] for end in ("", "_ci_low", "_ci_high"))
        assert interval == pytest.approx(st.bootstrap_mean(per_prompt, cfg.bootstrap_resamples, 0, cfg.interval_level))
        assert interval[1] < interval[0] < interval[2], name  # a 95% interval of these values is not a point


def test_a_table_over_other_prompts_is_left_out(tmp_path):
    now = {"a": 0.5, "b": 0.1}
    got = _compare(tmp_path, now, {0: {"a": 0.5, "b": 0.3, "c": 0.1}, 1: {"a": 0.4, "b": 0.0}})
    assert got["eval/win_rate_vs_initial"] is None and got["eval/reward_delta_vs_initial_ci_low"] is None
    assert got["eval/reward_delta_vs_previous"] == pytest.approx(0.1)


@pytest.mark.parametrize("content, message", [("not json\n", "not a JSON-lines"),
                                               ('{"prompt_id": "a"}\n', "lacks column"),
                                               ('{"prompt_id": "a", "reward": 1}\n' * 2, "duplicate prompt_id")])
def test_a_broken_archived_table_is_an_artifact_error(tmp_path, content, message):
    from rlhf.config.params import parse_params
    from rlhf.evaluation import comparison_metrics

    (tmp_path / "iter-0.jsonl").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        comparison_metrics(_table({"a": 0.1}), 1, tmp_path, parse_params(full_params()).eval, seed=0)


def test_several_samples_per_prompt_average_into_one_row_per_prompt():
    from rlhf.evaluation import per_prompt_table

    prompts = pd.DataFrame({"prompt_id": ["p", "q"], "query": ["Q1", "Q2"], "reference": ["R1", "R2"]})
    samples = pd.DataFrame({"row": [0, 0, 1, 1], "summary": ["a", "b", "c", "d"], "reward": [0.1, 0.3, 0.5, 0.9],
                            "kl": [1.0, 2.0, 0.0, 4.0], "length": [3, 5, 7, 7], "eos": [True, False, True, True]})
    table = per_prompt_table(prompts, samples)
    assert table["prompt_id"].tolist() == ["p", "q"] and table["summary"].tolist() == ["a", "c"]
    assert table["reward"].tolist() == pytest.approx([0.2, 0.7])
    assert table["kl"].tolist() == [1.5, 2.0] and table["length"].tolist() == [4.0, 7.0]
    assert table["eos"].tolist() == [0.5, 1.0] and table["summaries"].tolist() == [["a", "b"], ["c", "d"]]


@pytest.mark.parametrize("section, message", [
    ({"greedy": True, "samples_per_prompt": 4}, "eval.samples_per_prompt: greedy decoding gives one summary"),
    ({"greedy": False, "samples_per_prompt": 0}, "eval.samples_per_prompt"),
    ({"bootstrap_resamples": 10}, "eval.bootstrap_resamples"),
    ({"interval_level": 1.0}, "eval.interval_level"),
])
def test_bad_eval_params_are_rejected(section, message):
    from rlhf.config.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match=message):
        parse_params(full_params(eval=section))
