"""rlhf/artifacts/record.py is the one list of held-out metrics: what the evaluation computes, history.csv's columns,
the dvc.yaml plots and the glossary agree with it."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import full_params
from rlhf.artifacts import record

ROOT = Path(__file__).resolve().parents[1]


def test_every_comparison_the_evaluation_writes_is_a_history_column_and_nothing_else(tmp_path):
    """A key the evaluation writes but the registry lacks would be dropped from history.csv without a word; a
    registered interval must come with all of its columns."""
    from rlhf.config.params import parse_params
    from rlhf.evaluation import comparison_metrics

    rng = np.random.default_rng(0)
    table = lambda shift: pd.DataFrame({"prompt_id": range(12), "reward": rng.uniform(0, 1, 12) + shift,  # noqa: E731
                                        "rouge_l": rng.uniform(0, 1, 12), "length": rng.integers(5, 40, 12)})
    for it in (0, 1):
        record.write_table(table(0.0), record.table_path(tmp_path, it))
    got = comparison_metrics(table(0.1), 2, tmp_path / "samples", parse_params(full_params()).eval, seed=0)
    assert set(got) <= set(record.EVAL_COLUMNS), set(got) - set(record.EVAL_COLUMNS)
    for m in record.EVAL_METRICS:
        if m.interval:
            assert set(m.columns()) <= set(got), m.name
    assert 0 <= got["eval/reward_length_r2"] <= 1


def test_the_plots_read_registered_history_columns():
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    named = []
    for plot in plots:
        (spec,) = plot.values()
        for path, columns in spec["y"].items():
            if path.endswith("history.csv") and "train_history" not in path:
                named += [columns] if isinstance(columns, str) else columns
    assert named and set(named) <= set(record.EVAL_COLUMNS), set(named) - set(record.EVAL_COLUMNS)


def test_every_registered_metric_is_in_the_glossary():
    glossary = (ROOT / "docs" / "metrics.md").read_text()
    start = glossary.index("## `metrics/eval.json`")
    section = glossary[start:glossary.find("\n## ", start + 1)]
    names = set(re.findall(r"`([^`]+)`", section))
    assert [m.key for m in record.EVAL_METRICS if m.key not in names] == []


@pytest.mark.parametrize("metric, before, after, worse", [
    ("eos_rate", 0.90, 0.84, True), ("eos_rate", 0.90, 0.85, False), ("eos_rate", 0.80, 0.95, False),
    ("cut_rate", 0.10, 0.16, True), ("cut_rate", 0.10, 0.15, False),
    ("repeated_3gram_fraction", 0.05, 0.071, True), ("repeated_3gram_fraction", 0.05, 0.07, False),
    ("reward_mean", 0.3, 0.0, False),  # not a guardrail
])
def test_guardrail_thresholds(metric, before, after, worse):
    assert record.METRICS[metric].guardrail_worse(before, after) is worse


def test_a_table_compared_as_recorded_reads_back_equal_to_its_archive(tmp_path):
    rng = np.random.default_rng(1)
    table = pd.DataFrame({"prompt_id": range(20), "reward": rng.normal(size=20), "summary": ["a b"] * 20})
    record.write_table(table, tmp_path / "t.jsonl")
    archived = record.read_table(tmp_path / "t.jsonl")
    fresh = record.as_recorded(table).set_index("prompt_id")
    assert (fresh["reward"].to_numpy() == archived["reward"].to_numpy()).all()
    assert not (table["reward"].to_numpy() == archived["reward"].to_numpy()).all()  # the archive did round
