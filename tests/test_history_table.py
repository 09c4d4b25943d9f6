"""`rlhf history table`: one or more runs' held-out tables from their stored history.csv.

On hand-written histories: the cells in the registry's formats (intervals with "borderline" where a bound is within
its Monte-Carlo error of the null, "—" for a comparison with iteration 0 at iteration 0, "–" for a value not
recorded), the iteration choice, labels, other held-out metrics of the registry and train_history.csv columns; the
block written into a page, indented as its markers are; every bad input refused with one line and exit code 2,
leaving the page as it was; and no torch. Also `bench/paired_eval.py`, the table of two held-out tables paired by
prompt. The published tables rebuilt from docs/runs are checked in test_seeds.py (`published_tables`).
"""

import csv
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_without_torch, run
from rlhf.artifacts import record
from rlhf.errors import StateError
from rlhf.reports import blocks
from rlhf.reports import history as hist

HEAD = ("| iteration | reward | Δ reward vs it. 0 [95%] | win rate vs it. 0 [95%] | EOS rate | repeated 3-grams | "
        "length | KL |")


def write_history(folder: Path, rows: list[dict], name: str = "history.csv", columns=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns or record.EVAL_COLUMNS, lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(iteration: int, reward: float, delta: tuple, win: tuple, eos: float, rep: float, length: float,
        kl: float) -> dict:
    """A history row; delta and win: (point, low, high[, mc])."""
    out = {"iteration": iteration, "eval/reward_mean": reward, "eval/eos_rate": eos,
           "eval/repeated_3gram_fraction": rep, "eval/length_mean": length, "eval/kl_mean": kl}
    for key, values in (("eval/reward_delta_vs_initial", delta), ("eval/win_rate_vs_initial", win)):
        for end, v in zip(record.INTERVAL_ENDS, values):
            out[key + end] = v
    return out


@pytest.fixture
def a_run(tmp_path) -> Path:
    folder = tmp_path / "run-a"
    write_history(folder, [
        row(0, 0.30042, (0.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.5, 0.0), 0.578125, 0.0671535, 39.3125, 1.5e-7),
        row(1, 0.33501, (0.034592, -0.014865, 0.084973, 0.0004), (0.609375, 0.484375, 0.734375, 0.0), 0.796875,
            0.0326449, 32.28125, 0.8888154),
        # a lower bound within its Monte-Carlo error (0.0012) of 0: borderline
        row(2, 0.3111, (0.0107, 0.0009, 0.0215, 0.0012), (0.55, 0.43, 0.67, 0.0), 0.5, 0.08, 42.0, 1.9622),
        {"iteration": 3, "eval/reward_mean": 0.35, "eval/eos_rate": 0.64},  # a record without the rest
    ])
    return folder


def test_one_run_in_the_registry_formats(a_run):
    """Each cell in its metric's format from the registry, with the interval's bounds; iteration 0's comparisons
    with itself are "—", values the history does not hold "–", and the level comes from the run's params.yaml."""
    (a_run / "params.yaml").write_text("eval:\n  interval_level: 0.95\n")
    assert hist.table([a_run]) == "\n".join([
        HEAD, "|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| 0 | 0.3004 | — | — | 0.58 | 0.067 | 39.3 | 0.000 |",
        "| 1 | 0.3350 | +0.0346 [-0.0149, +0.0850] | 0.61 [0.48, 0.73] | 0.80 | 0.033 | 32.3 | 0.889 |",
        "| 2 | 0.3111 | +0.0107 [+0.0009, +0.0215] borderline | 0.55 [0.43, 0.67] | 0.50 | 0.080 | 42.0 | 1.962 |",
        "| 3 | 0.3500 | – | – | 0.64 | – | – | – |", ""])


def test_the_interval_level_is_the_runs_own(a_run, tmp_path):
    (a_run / "params.yaml").write_text("eval:\n  interval_level: 0.9\n")
    assert hist.table([a_run], iterations=["1"]).startswith(HEAD.replace("[95%]", "[90%]"))
    (a_run / "params.yaml").unlink()  # a run that does not name its level: the header does not invent one
    assert hist.table([a_run], iterations=["1"]).startswith(HEAD.replace("[95%]", "[interval]"))
    other = tmp_path / "run-b"
    write_history(other, [row(0, 0.3, (0, 0, 0, 0), (0.5, 0.5, 0.5, 0), 0.5, 0.05, 30.0, 0.0)])
    (other / "params.yaml").write_text("eval:\n  interval_level: 0.95\n")
    (a_run / "params.yaml").write_text("eval:\n  interval_level: 0.9\n")
    with pytest.raises(StateError, match="different levels"):
        hist.table([a_run, other])


@pytest.mark.parametrize("spec, shown", [("0,2", [0, 2]), ("1-", [1, 2, 3]), ("2-3,0", [2, 3, 0]),
                                         ("1,1-2", [1, 2]), (None, [0, 1, 2, 3])])
def test_the_iterations_shown_are_the_ones_named(a_run, spec, shown):
    lines = hist.table([a_run], iterations=[spec] if spec else None).splitlines()[2:]
    assert [int(line.split(" | ")[0].removeprefix("| ")) for line in lines] == shown


def test_several_runs_with_labels_iterations_and_a_train_column(a_run, tmp_path):
    """A run column first; one --iterations for every run or one per run; train_history.csv's columns after the
    held-out ones, in the registry's format, "–" where an iteration has no training row (iteration 0)."""
    other = tmp_path / "nested"
    write_history(other / "metrics", [row(0, 0.3, (0, 0, 0, 0), (0.5, 0.5, 0.5, 0), 0.5, 0.05, 30.0, 0.0),
                                       row(1, 0.25, (-0.05, -0.11, 0.004), (0.44, 0.31, 0.56), 0.92, 0.034, 22.5,
                                           1.6156)])
    write_history(other / "metrics", [{"iteration": 1, "val/explained_variance": -0.0634227}], "train_history.csv",
                  ["iteration", "val/explained_variance"])
    text = hist.table([a_run, other], ["base", "λ 0.95"], ["1", "0-1"], ["val/explained_variance"])
    lines = text.splitlines()
    assert lines[0] == "| run | " + HEAD.removeprefix("| ").replace("[95%]", "[interval]") + \
        " critic explained variance |"
    assert lines[1] == "|---|" + "---:|" * 9
    assert lines[2].startswith("| base | 1 | 0.3350 |") and lines[2].endswith(" | 0.889 | – |")
    assert lines[3] == "| λ 0.95 | 0 | 0.3000 | — | — | 0.50 | 0.050 | 30.0 | 0.000 | – |"
    assert lines[4] == ("| λ 0.95 | 1 | 0.2500 | -0.0500 [-0.1100, +0.0040] | 0.44 [0.31, 0.56] | 0.92 | 0.034 | "
                        "22.5 | 1.616 | -0.06 |")
    assert len(lines) == 5
    # without labels, the folders' names
    assert hist.table([a_run, other], iterations=["1"]).splitlines()[3].startswith("| nested | 1 |")


def test_other_held_out_metrics_of_the_registry_follow_the_default_columns(a_run):
    """--metric adds registry metrics after the default columns, in the order given, with the registry's label,
    format and interval; iteration 0 has no previous iteration, so its Δ vs previous is "—" like its Δ vs itself."""
    (a_run / "params.yaml").write_text("eval:\n  interval_level: 0.95\n")
    rows = [r for r in record.read_history(a_run / "history.csv")]
    rows[0]["eval/distinct_2"] = "0.608950452850293"
    rows[1] |= {"eval/distinct_2": "0.6755142667551427", "eval/reward_delta_vs_previous": "0.034592",
                "eval/reward_delta_vs_previous_ci_low": "-0.014865", "eval/reward_delta_vs_previous_ci_high": "0.084973"}
    write_history(a_run, rows)
    lines = hist.table([a_run], iterations=["0-1"], metrics=["reward_delta_vs_previous", "distinct_2"]).splitlines()
    assert lines[0] == HEAD + " Δ reward vs previous [95%] | distinct 2-grams |"
    assert lines[1] == "|---:|" + "---:|" * 9
    assert lines[2] == "| 0 | 0.3004 | — | — | 0.58 | 0.067 | 39.3 | 0.000 | — | 0.609 |"
    assert lines[3].endswith(" | 0.889 | +0.0346 [-0.0149, +0.0850] | 0.676 |")
    # the default columns are the same with or without extra ones
    assert [line.rsplit(" | ", 2)[0] + " |" for line in lines[2:]] == hist.table([a_run], iterations=["0-1"]
                                                                                 ).splitlines()[2:]


def test_a_block_inside_a_list_item_keeps_its_indentation():
    page = "- item:\n\n  <!-- t:start -->\n  old\n  <!-- t:end -->\n\n<!-- u:start -->\nx\n<!-- u:end -->\n"
    new = blocks.replace_block(page, "t", "| a |\n|---|\n| 1 |\n", "page")
    assert new == ("- item:\n\n  <!-- t:start -->\n  | a |\n  |---|\n  | 1 |\n  <!-- t:end -->\n\n"
                   "<!-- u:start -->\nx\n<!-- u:end -->\n")
    assert blocks.block(new, "t") == "| a |\n|---|\n| 1 |\n"  # as the command printed it
    assert blocks.replace_block(new, "u", "y\n", "page").endswith("<!-- u:start -->\ny\n<!-- u:end -->\n")


# --------------------------------------------------------------------------------------------- the command


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_the_command_writes_the_block_it_prints(a_run, tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# P\n\n<!-- h:start -->\n<!-- h:end -->\n\ntext\n")
    result = run(["rlhf", "history", "table", str(a_run), "-i", "0-1", "--into", str(page), "--block", "h"], tmp_path)
    assert result.stdout == hist.table([a_run], iterations=["0-1"])
    assert page.read_text() == f"# P\n\n<!-- h:start -->\n{result.stdout}<!-- h:end -->\n\ntext\n"


@pytest.mark.parametrize("args, words", [
    (["{empty}"], "no history.csv or metrics/history.csv"),
    (["{missing}"], "no history.csv or metrics/history.csv"),
    (["{broken}"], "not a history CSV"),
    (["{run}", "-i", "0,7"], "no iteration 7 in its history (it has 0–3)"),
    (["{run}", "-i", "5-"], "no iteration from 5 on"),
    (["{run}", "-i", "2-1"], "is empty"),
    (["{run}", "-i", "one"], "expected iterations N, ranges A-B or A-"),
    (["{run}", "{run}", "-i", "1", "-i", "1", "-i", "1"], "3 --iterations for 2 run folders"),
    (["{run}", "-l", "a", "-l", "b"], "2 --label for 1 run folders"),
    (["{run}", "--train-metric", "val/explained"], "--train-metric val/explained: not one of"),
    (["{run}", "--metric", "distinct-2"], "--metric distinct-2: not one of"),
    (["{run}", "--metric", "kl_mean"], "--metric kl_mean: already a column"),
    (["{run}", "--into", "{page}", "--block", "nowhere"], "needs exactly one block <!-- nowhere:start -->"),
    (["{run}", "--into", "{twice}", "--block", "h"], "needs exactly one block <!-- h:start -->"),
    (["{run}", "--into", "{missing}/page.md"], "No such file or directory"),
])
def test_bad_inputs_give_one_line_and_leave_the_page_alone(a_run, tmp_path, args, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "history.csv").write_text("step,eval/reward_mean\n1,0.3\n")
    page, twice = tmp_path / "page.md", tmp_path / "twice.md"
    page.write_text("# P\n\n<!-- h:start -->\nold\n<!-- h:end -->\n")
    twice.write_text(page.read_text() * 2)
    before = page.read_text(), twice.read_text()
    names = {"run": a_run, "empty": tmp_path / "empty", "missing": tmp_path / "missing", "page": page,
             "twice": twice, "broken": tmp_path / "broken"}
    result = run(["rlhf", "history", "table", *(a.format(**names) for a in args)], tmp_path, check=False)
    assert words in one_line_error(result)
    assert (page.read_text(), twice.read_text()) == before


def test_history_table_runs_without_torch(a_run):
    """`rlhf history table` reads CSV and YAML only: it must not import torch (seconds to load, and absent where
    stored runs are only read)."""
    out = cli_without_torch("history", "table", str(a_run), "--train-metric", "val/explained_variance")
    assert "| 1 | 0.3350 |" in out and out.rstrip().endswith("no torch")


# --------------------------------------------------------------------------------------------- bench/paired_eval.py


def write_samples(path: Path, rewards: dict[int, float], eos: float = 1.0, reverse: bool = False) -> Path:
    """A held-out table (one JSON row per prompt) with the given rewards, in prompt order or its reverse."""
    import json

    rows = [{"prompt_id": pid, "summary": f"summary {pid} of the post", "reward": r, "eos": eos, "length": 5}
            for pid, r in sorted(rewards.items(), reverse=reverse)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paired_eval_writes_the_table_it_prints_into_a_block(tmp_path):
    """B over A paired by prompt id (not by row), in the run record's formats, A's own comparisons "—"; with --into
    the printed table is the block; a pair of tables on different prompts, or one label, is one line and exit 2."""
    import numpy as np

    from rlhf.reports import statistics as st

    gen = np.random.default_rng(3)
    base = {pid: float(gen.random()) for pid in range(100, 140)}
    better = {pid: r + float(gen.normal(0.1, 0.1)) for pid, r in base.items()}
    a, b = write_samples(tmp_path / "a.jsonl", base, eos=0.0, reverse=True), write_samples(tmp_path / "b.jsonl", better)
    page = tmp_path / "page.md"
    page.write_text("# P\n\n<!-- p:start -->\nold\n<!-- p:end -->\n")
    script = str(ROOT / "bench" / "paired_eval.py")
    result = run([sys.executable, script, str(a), str(b), "-l", "base", "-l", "new", "--into", str(page), "--block",
                  "p"], tmp_path)
    ids = sorted(base)
    delta = st.bootstrap_interval([better[i] - base[i] for i in ids], 2000, 0, 0.95)
    win = st.bootstrap_interval(st.wins([better[i] for i in ids], [base[i] for i in ids]), 2000, 0, 0.95)
    d2 = st.distinct_n([f"summary {pid} of the post" for pid in ids])
    lines = result.stdout.splitlines()
    assert lines[0] == ("| side | reward | Δ reward vs A [95%] | win rate vs A [95%] | EOS rate | repeated 3-grams | "
                        "distinct-2 | length |")
    assert lines[2] == f"| A: base | {np.mean(list(base.values())):.4f} | — | — | 0.00 | 0.000 | {d2:.3f} | 5.0 |"
    assert lines[3] == (f"| B: new | {np.mean(list(better.values())):.4f} | {st.interval_text(delta, '+.4f')} | "
                        f"{st.interval_text(win, '.2f', 0.5)} | 1.00 | 0.000 | {d2:.3f} | 5.0 |")
    assert delta.low > 0 and len(lines) == 4
    assert page.read_text() == f"# P\n\n<!-- p:start -->\n{result.stdout}<!-- p:end -->\n"
    before = page.read_text()
    other = write_samples(tmp_path / "c.jsonl", {pid + 1: r for pid, r in base.items()})
    for args, words in (([str(a), str(other)], "different prompts"), ([str(a), str(b), "-l", "x"], "1 --label")):
        bad = run([sys.executable, script, *args, "--into", str(page), "--block", "p"], tmp_path, check=False)
        assert words in one_line_error(bad)
    assert page.read_text() == before
