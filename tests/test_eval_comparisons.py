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
    assert line.count("[") == 3  # Δ reward, win rate and Δ ROUGE-L, each with its interval
    assert "ROUGE-L" in out and "length-adjusted" in out
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
                            "kl": [1.0, 2.0, 0.0, 4.0], "length": [3, 5, 7, 7], "eos": [True, False, True, True],
                            "rouge_1": [0.2, 0.4, 0.0, 1.0], "rouge_2": [0.0, 0.2, 0.0, 0.5],
                            "rouge_l": [0.1, 0.3, 0.0, 0.8]})
    table = per_prompt_table(prompts, samples)
    assert table["prompt_id"].tolist() == ["p", "q"] and table["summary"].tolist() == ["a", "c"]
    assert table["reward"].tolist() == pytest.approx([0.2, 0.7])
    assert table["kl"].tolist() == [1.5, 2.0] and table["length"].tolist() == [4.0, 7.0]
    assert table["eos"].tolist() == [0.5, 1.0] and table["summaries"].tolist() == [["a", "b"], ["c", "d"]]
    assert table["rouge_l"].tolist() == pytest.approx([0.2, 0.4]) and table["rouge_2"].tolist() == [0.1, 0.25]


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


# --- the independent judge (ROUGE), length control and the reward/judge disagreement ---------------------------------

def test_rouge_matches_the_packages_documented_example_and_a_hand_computed_case():
    from rlhf.reports.judge import rouge

    # rouge-score's README example (target first there): rouge1 P 0.75 R 0.6667, rougeL P 0.625 R 0.5556
    got = rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert got["rouge_1"][0] == pytest.approx(2 * 0.75 * (2 / 3) / (0.75 + 2 / 3))
    assert got["rouge_l"][0] == pytest.approx(2 * 0.625 * (5 / 9) / (0.625 + 5 / 9))
    # by hand: "the cat sat on the mat" vs "the cat lay on a mat": unigrams the, cat, on, mat shared (4 of 6 each side);
    # bigrams (the cat) only of 5 each; LCS "the cat on mat" = 4 tokens
    got = rouge(["the cat sat on the mat", "", "Cats were running!"], ["the cat lay on a mat", "a mat", "cat runs"])
    assert got["rouge_1"].tolist() == pytest.approx([4 / 6, 0.0, 2 * (2 / 3) * 1.0 / (2 / 3 + 1.0)])
    assert got["rouge_2"][0] == pytest.approx(1 / 5)
    assert got["rouge_l"][0] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="one each"):
        rouge(["a"], [])


def _judged(values: dict) -> pd.DataFrame:
    """prompt_id → (reward, rouge_l, length) as a held-out table."""
    return pd.DataFrame({"prompt_id": list(values), "reward": [v[0] for v in values.values()],
                         "rouge_l": [v[1] for v in values.values()], "length": [v[2] for v in values.values()]})


def _compare_judged(tmp_path, now: dict, initial: dict, iteration: int = 1) -> dict:
    from rlhf.config.params import parse_params
    from rlhf.evaluation import comparison_metrics

    _judged(initial).to_json(tmp_path / "iter-0.jsonl", orient="records", lines=True)
    return comparison_metrics(_judged(now), iteration, tmp_path, parse_params(full_params()).eval, seed=0)


def test_identical_summaries_tie_although_the_archive_is_rounded(tmp_path):
    """Iteration 0's table is archived at record.TABLE_DECIMALS decimals; a fresh table is compared as it will be
    archived, so a prompt whose summary (and so its scores) did not change is a tie, 0.5, not a win or a loss decided
    by the rounding of one side."""
    import numpy as np

    from rlhf.artifacts import record
    from rlhf.config.params import parse_params
    from rlhf.evaluation import comparison_metrics

    cfg = parse_params(full_params()).eval
    rng = np.random.default_rng(3)
    initial = {f"p{i}": (float(r), float(q), 30.0) for i, (r, q) in enumerate(rng.uniform(0, 1, (12, 2)))}
    record.write_table(_judged(initial), tmp_path / "iter-0.jsonl")
    got = comparison_metrics(_judged(initial), 1, tmp_path, cfg, seed=0)  # every summary as at iteration 0
    for name in ("win_rate_vs_initial", "rouge_l_win_rate_vs_initial"):
        assert [got[f"eval/{name}{end}"] for end in ("", "_ci_low", "_ci_high")] == [0.5, 0.5, 0.5], name
    now = {k: (v[0] + 0.1, v[1] + 0.1, 30.0) if k in ("p8", "p9", "p10", "p11") else v for k, v in initial.items()}
    got = comparison_metrics(_judged(now), 1, tmp_path, cfg, seed=0)  # 8 ties, 4 wins
    assert got["eval/win_rate_vs_initial"] == got["eval/rouge_l_win_rate_vs_initial"] == (8 * 0.5 + 4) / 12


def test_rouge_comparisons_are_the_rewards_code_path_on_the_same_numbers(tmp_path):
    rng = __import__("numpy").random.default_rng(0)
    initial = {f"p{i}": (float(x), float(x), 10.0) for i, x in enumerate(rng.uniform(0, 1, 40))}
    now = {k: (v[0] + float(d), v[0] + float(d), 10.0) for (k, v), d in zip(initial.items(), rng.normal(0.05, 0.1, 40))}
    got = _compare_judged(tmp_path, now, initial)
    for end in ("", "_ci_low", "_ci_high"):
        assert got[f"eval/rouge_l_delta_vs_initial{end}"] == got[f"eval/reward_delta_vs_initial{end}"]
        assert got[f"eval/rouge_l_delta_vs_previous{end}"] == got[f"eval/reward_delta_vs_previous{end}"]
        assert got[f"eval/rouge_l_win_rate_vs_initial{end}"] == got[f"eval/win_rate_vs_initial{end}"]
    assert got["eval/rouge_l_delta_vs_initial_ci_low"] < got["eval/rouge_l_delta_vs_initial_ci_high"]


@pytest.mark.parametrize("reward_step, rouge_step, flag, words", [
    (+0.3, -0.3, 1, "possible reward hacking"),
    (-0.3, +0.3, -1, "the reward model disagrees with the judge"),
    (+0.3, +0.3, 0, None),
    (+0.3, 0.0, 0, None),
])
def test_the_disagreement_warning_fires_only_when_both_intervals_exclude_zero_in_opposite_directions(
        tmp_path, capsys, reward_step, rouge_step, flag, words):
    from rlhf.evaluation import comparison_line
    from rlhf.reports.judge import disagreement_warning

    rng = __import__("numpy").random.default_rng(1)
    initial = {f"p{i}": (0.5, 0.3, 20.0) for i in range(30)}
    now = {k: (0.5 + reward_step + float(e), 0.3 + rouge_step + float(f), 20.0)
           for k, e, f in zip(initial, rng.normal(0, 0.05, 30), rng.normal(0, 0.05, 30))}
    got = _compare_judged(tmp_path, now, initial)
    assert got["eval/judge_disagreement"] == flag
    line = comparison_line({**got, "eval/repeated_3gram_fraction": 0.0})
    if words is None:
        assert "WARNING" not in line and disagreement_warning(flag) is None
    else:
        assert words in line and "WARNING" in line


def test_the_summary_table_names_each_iteration_whose_judges_disagree(tmp_path, monkeypatch, capsys):
    """The `rlhf train` table repeats the warning in words under the rows, for the iterations flagged either way
    (+1 possible hacking, −1 the reverse) and for no other."""
    from rlhf.config.params import parse_params
    from rlhf.project import EVAL_COLUMNS, print_summary
    from rlhf.reports.judge import disagreement_warning

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    flags = {0: "", 1: "0", 2: "1", 3: "-1", 4: "0"}
    with open(tmp_path / "metrics" / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=EVAL_COLUMNS)
        writer.writeheader()
        writer.writerows({"iteration": i, "eval/judge_disagreement": flag} for i, flag in flags.items())
    print_summary(parse_params(full_params()))
    out = capsys.readouterr().out
    warned = [line for line in out.splitlines() if "WARNING" in line]
    assert warned == [f"iteration 2: {disagreement_warning(1)}", f"iteration 3: {disagreement_warning(-1)}"]
    assert "possible reward hacking" in warned[0] and "disagrees with the judge" in warned[1]


def test_the_length_adjusted_change_removes_a_gain_that_is_only_length(tmp_path):
    # iteration 0: reward rises 0.01 per token across prompts; the new policy only writes 20 tokens longer
    initial = {f"p{i}": (0.01 * n, 0.2, float(n)) for i, n in enumerate(range(10, 50, 2))}
    now = {k: (v[0] + 0.2, 0.2, v[2] + 20) for k, v in initial.items()}
    got = _compare_judged(tmp_path, now, initial)
    assert got["eval/reward_length_slope"] == pytest.approx(0.01)
    assert got["eval/reward_delta_vs_initial"] == pytest.approx(0.2)
    assert got["eval/length_delta_vs_initial"] == pytest.approx(20.0)
    for end in ("", "_ci_low", "_ci_high"):
        assert got[f"eval/reward_delta_vs_initial_length_adjusted{end}"] == pytest.approx(0.0, abs=1e-12)
    # the same gain at unchanged length keeps all of it
    got = _compare_judged(tmp_path, {k: (v[0] + 0.2, 0.2, v[2]) for k, v in initial.items()}, initial)
    assert got["eval/reward_delta_vs_initial_length_adjusted"] == pytest.approx(0.2)


def test_the_slope_is_least_squares_against_a_float64_loop():
    from rlhf.reports.statistics import least_squares_slope

    x, y = [3.0, 7.0, 1.0, 9.0, 4.0], [0.2, 0.9, 0.1, 0.7, 0.5]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    assert least_squares_slope(x, y) == pytest.approx(slope, rel=1e-12)
    assert least_squares_slope([5.0, 5.0], [0.1, 0.9]) == 0.0  # no spread in length: nothing to explain


def test_an_archive_written_before_rouge_leaves_only_the_rouge_comparisons_out(tmp_path, capsys):
    now = {"a": (0.5, 0.2, 10.0), "b": (0.1, 0.3, 12.0)}
    _table({"a": 0.4, "b": 0.0}).to_json(tmp_path / "iter-0.jsonl", orient="records", lines=True)
    from rlhf.config.params import parse_params
    from rlhf.evaluation import comparison_metrics

    got = comparison_metrics(_judged(now), 1, tmp_path, parse_params(full_params()).eval, seed=0)
    assert got["eval/reward_delta_vs_initial"] == pytest.approx(0.1)
    assert got["eval/rouge_l_delta_vs_initial"] is None and got["eval/judge_disagreement"] is None
    assert got["eval/reward_delta_vs_initial_length_adjusted"] is None  # the old table has no length either
    assert "has no rouge_l column" in capsys.readouterr().err


def test_init_force_starts_a_new_history(project, tmp_path):
    """Rows and held-out tables of the run that `init --force` replaces would read as the new run's iterations (and
    a stale iteration-1 table as its previous iteration)."""
    repo = copy_repo(project, tmp_path / "repo")
    assert [r["iteration"] for r in csv.DictReader((repo / "metrics/history.csv").open())] == ["0", "1"]
    run(["rlhf", "init", "--force", "--no-track"], repo)
    assert [r["iteration"] for r in csv.DictReader((repo / "metrics/history.csv").open())] == ["0"]
    assert not (repo / "metrics/train_history.csv").exists()
    assert sorted(p.name for p in (repo / "metrics/samples").iterdir()) == ["iter-0.jsonl"]
    run(["rlhf", "init", "--force", "--no-baseline", "--no-track"], repo)
    assert not (repo / "metrics/history.csv").exists() and not (repo / "metrics/eval_initial.json").exists()
    assert list((repo / "metrics/samples").iterdir()) == []
