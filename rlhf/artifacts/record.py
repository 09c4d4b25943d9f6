"""The run record: what a held-out evaluation writes and every report reads, without torch.

- The metric registry (`EVAL_METRICS`): each held-out metric's name (its key in eval.json and its column in
  metrics/history.csv is `eval/<name>`), the label tables give it, its number format, whether it comes with an
  interval (then `_ci_low`, `_ci_high` and `_ci_mc`, the bounds' Monte-Carlo error, follow it), the value a claim
  about it is measured against, and, for a guardrail, which way is worse and by how much. history.csv's columns,
  the `rlhf train` table, `rlhf seeds`, `rlhf history` and the plot check read it from here: a new held-out metric
  is one entry here plus its computation in rlhf/evaluation.py. `TRAIN_METRICS` names and formats the
  train_history.csv columns that tables show.
- history.csv: read, and one iteration's row upserted.
- The per-iteration held-out tables (metrics/samples/iter-N.jsonl, one row per held-out prompt): written at
  `TABLE_DECIMALS` decimals, read back indexed by prompt id. Whatever compares a fresh table with an archived one
  compares `as_recorded(fresh)`, the fresh table as it will read back, so both sides carry the same rounding and
  identical summaries tie.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from rlhf.artifacts.files import atomic_write_text
from rlhf.errors import ArtifactError


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    fmt: str
    interval: bool = False
    null: float | None = None  # a change is judged against 0, a win rate against 0.5
    worse: int = 0  # guardrail: −1 lower is worse, +1 higher is worse, 0 no guardrail
    tolerance: float = 0.0  # guardrail: a change beyond this in the worse direction counts as worse

    @property
    def key(self) -> str:
        return f"eval/{self.name}"

    def columns(self) -> list[str]:
        return [self.key + end for end in (INTERVAL_ENDS if self.interval else ("",))]

    def guardrail_worse(self, before: float, after: float) -> bool:
        # 1e-12: a change of exactly the tolerance (0.07 − 0.05 is 0.020000000000000004 in floats) is not beyond it
        return self.worse != 0 and self.worse * (after - before) > self.tolerance + 1e-12


INTERVAL_ENDS = ("", "_ci_low", "_ci_high", "_ci_mc")

EVAL_METRICS = (
    Metric("reward_mean", "reward", ".4f"),
    Metric("reward_std", "reward sd", ".4f"),
    Metric("kl_mean", "KL", ".3f"),
    Metric("length_mean", "length", ".1f"),
    Metric("eos_rate", "EOS rate", ".2f", worse=-1, tolerance=0.05),
    # no EOS within the length limit: the summary was cut, not finished
    Metric("cut_rate", "cut at the length limit", ".2f", worse=+1, tolerance=0.05),
    Metric("repeated_3gram_fraction", "repeated 3-grams", ".3f", worse=+1, tolerance=0.02),
    Metric("distinct_2", "distinct 2-grams", ".3f"),
    Metric("reward_delta_vs_initial", "Δ reward vs it. 0", "+.4f", interval=True, null=0.0),
    Metric("reward_delta_vs_previous", "Δ reward vs previous", "+.4f", interval=True, null=0.0),
    Metric("win_rate_vs_initial", "win rate vs it. 0", ".2f", interval=True, null=0.5),
    Metric("rouge_1_mean", "ROUGE-1", ".4f"),
    Metric("rouge_2_mean", "ROUGE-2", ".4f"),
    Metric("rouge_l_mean", "ROUGE-L", ".4f"),
    Metric("rouge_l_delta_vs_initial", "Δ ROUGE-L vs it. 0", "+.4f", interval=True, null=0.0),
    Metric("rouge_l_delta_vs_previous", "Δ ROUGE-L vs previous", "+.4f", interval=True, null=0.0),
    Metric("rouge_l_win_rate_vs_initial", "ROUGE-L win rate vs it. 0", ".2f", interval=True, null=0.5),
    Metric("length_delta_vs_initial", "Δ length vs it. 0", "+.1f", interval=True, null=0.0),
    Metric("reward_delta_vs_initial_length_adjusted", "length-adjusted Δ reward", "+.4f", interval=True, null=0.0),
    Metric("reward_length_slope", "reward per token at it. 0", ".5f"),
    # the length control's power: the share of iteration 0's reward variance that length explains
    Metric("reward_length_r2", "R² of reward on length at it. 0", ".3f"),
    Metric("judge_disagreement", "judges disagree", ".0f"),
)
METRICS = {m.name: m for m in EVAL_METRICS}
EVAL_COLUMNS = ["iteration", *(c for m in EVAL_METRICS for c in m.columns())]
# the columns of `rlhf seeds report`, in its order
PER_SEED = [METRICS[name] for name in ("reward_mean", "rouge_l_mean", "win_rate_vs_initial",
                                       "rouge_l_win_rate_vs_initial", "eos_rate", "cut_rate",
                                       "repeated_3gram_fraction", "length_mean")]
GUARDRAILS = [m for m in EVAL_METRICS if m.worse]
# the columns of `rlhf history table` (one run's held-out table), in its order
PER_RUN = [METRICS[name] for name in ("reward_mean", "reward_delta_vs_initial", "win_rate_vs_initial", "eos_rate",
                                      "repeated_3gram_fraction", "length_mean", "kl_mean")]


@dataclass(frozen=True)
class TrainMetric:
    """A column of metrics/train_history.csv (the rollout and update of each iteration, rlhf/project.py's
    TRAIN_COLUMNS) that a table can show beside the held-out ones."""

    key: str
    label: str
    fmt: str


TRAIN_METRICS = {m.key: m for m in (
    TrainMetric("val/explained_variance", "critic explained variance", ".2f"),
    TrainMetric("policy/approxkl", "approxkl", ".4f"),
    TrainMetric("policy/clipfrac", "clip fraction", ".3f"),
    TrainMetric("loss/value", "value loss", ".3f"),
)}

# The per-prompt columns that are compared between iterations, and the names of their comparisons.
JUDGES = {"rouge_l": "ROUGE-L", "reward": "reward"}  # per-prompt column → label
WIN_RATE = {"reward": "win_rate_vs_initial", "rouge_l": "rouge_l_win_rate_vs_initial"}

TABLE_DECIMALS = 10  # pandas' default for to_json, kept so archives written before this module read the same


# --------------------------------------------------------------------------------------------- history.csv


def read_history(path: Path) -> list[dict]:
    """The rows of a history CSV (empty when absent)."""
    path = Path(path)
    return list(csv.DictReader(path.open())) if path.exists() else []


def upsert_csv(path: Path, columns: list[str], row: dict) -> None:
    """Insert or replace the row of row["iteration"] (idempotent, so a resumed `advance` is harmless)."""
    rows = [r for r in read_history(path) if int(r["iteration"]) != int(row["iteration"])]
    rows.append({k: row.get(k, "") for k in columns})
    rows.sort(key=lambda r: int(r["iteration"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def value(row: dict, key: str) -> float | None:
    """A history value as a float; None where the cell is empty (an older history, or a comparison left out)."""
    text = row.get(key) or ""
    return float(text) if text else None


# --------------------------------------------------------------------------------------------- held-out tables


def table_path(metrics_dir: Path, iteration: int) -> Path:
    return Path(metrics_dir) / "samples" / f"iter-{iteration}.jsonl"


def to_jsonl(table: pd.DataFrame) -> str:
    return table.to_json(orient="records", lines=True, double_precision=TABLE_DECIMALS)


def write_table(table: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, to_jsonl(table))


def as_recorded(table: pd.DataFrame) -> pd.DataFrame:
    """`table` as it reads back once written: the precision an archived table is compared at."""
    return pd.read_json(io.StringIO(to_jsonl(table)), lines=True)


def read_table(path: Path) -> pd.DataFrame | None:
    """A held-out table (metrics/samples/iter-N.jsonl) indexed by prompt_id; None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        table = pd.read_json(path, lines=True)
    except ValueError as err:
        raise ArtifactError(f"{path}: not a JSON-lines sample table ({str(err).splitlines()[0]})") from None
    return checked(table, path)


def checked(table: pd.DataFrame, where) -> pd.DataFrame:
    missing = {"prompt_id", "reward"} - set(table.columns)
    if missing:
        raise ArtifactError(f"{where}: sample table lacks column(s) {sorted(missing)}")
    if table["prompt_id"].duplicated().any():
        raise ArtifactError(f"{where}: sample table has duplicate prompt_id rows")
    return table.set_index("prompt_id")


def column(table: pd.DataFrame | None, name: str) -> pd.Series | None:
    """One per-prompt column of a held-out table as floats; None when the table is absent or predates the column
    (an archive written before ROUGE was judged has no rouge_l: its ROUGE comparisons are left out, not faked)."""
    if table is None or name not in table.columns:
        return None
    return table[name].astype(float)


def cut_share(table: pd.DataFrame, max_new_tokens: int) -> float:
    """Share of the held-out summaries cut at the length limit (no EOS within max_new_tokens tokens). A table's
    `cut` column holds it per prompt; a table without one (written before it was recorded) is read from its EOS and
    length columns, exact for one summary per prompt."""
    if "cut" in table.columns:
        return float(table["cut"].astype(float).mean())
    eos, length = table["eos"].astype(float), table["length"].astype(float)
    return float(((eos == 0) & (length >= max_new_tokens)).mean())
