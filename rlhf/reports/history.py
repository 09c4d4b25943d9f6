"""`rlhf history table`: the held-out table of one or more stored runs, read from their history.csv (Markdown).

A run folder is anything that holds the history `rlhf train` writes: a project or `rlhf seeds run` folder
(`metrics/history.csv`) or a run kept under docs/runs/ (`history.csv`). The columns are the run record's
(rlhf/artifacts/record.py: `PER_RUN`, labels and number formats from its registry), optionally followed by other
held-out metrics of the registry (`METRICS`, e.g. the Δ vs the previous iteration or distinct 2-grams) and by columns
of the run's train_history.csv (`TRAIN_METRICS`). Reads CSV and YAML only, so it never imports torch.

Several runs give one table with a `run` column first (a label per run, or the folder's name). The interval level
in the headers is the one the runs' params.yaml name (`eval.interval_level`); a run without one does not say.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from rlhf.artifacts import record
from rlhf.errors import StateError
from rlhf.reports import statistics as st

NOT_COMPARED = "—"  # a comparison with iteration 0, at iteration 0
MISSING = "–"  # not recorded (an older history, or a comparison left out)
SPEC = re.compile(r"(\d+)(?:-(\d*))?")


@dataclass
class Run:
    label: str
    folder: Path
    history: dict[int, dict]
    train: dict[int, dict]

    def span(self) -> str:
        its = sorted(self.history)
        if len(its) > 2 and its == list(range(its[0], its[-1] + 1)):
            return f"{its[0]}–{its[-1]}"
        return ", ".join(map(str, its))


def history_file(folder: Path, name: str = "history.csv") -> Path | None:
    """The run's history: history.csv in the folder, else metrics/history.csv (None if neither exists)."""
    for path in (folder / name, folder / "metrics" / name):
        if path.is_file():
            return path
    return None


def load(folder: Path, label: str | None = None) -> Run:
    folder = Path(folder)
    path = history_file(folder)
    if path is None:
        raise StateError(f"{folder}: no history.csv or metrics/history.csv (the held-out record `rlhf train` writes)")
    history = by_iteration(path)
    if not history:
        raise StateError(f"{path}: no iteration recorded")
    return Run(label or folder.name, folder, history, by_iteration(path.with_name("train_history.csv")))


def by_iteration(path: Path) -> dict[int, dict]:
    """A history CSV's rows by iteration (empty when the file is absent)."""
    try:
        return {int(r["iteration"]): r for r in record.read_history(path)}
    except (KeyError, ValueError, TypeError):
        raise StateError(f"{path}: not a history CSV (every row needs an integer `iteration`)") from None


def parse_iterations(spec: str | None) -> list[tuple[int, int | None]]:
    """"0,4,6-9,12-" → [(0, 0), (4, 4), (6, 9), (12, None)]: N is one iteration, A-B a closed range, A- from A to
    each run's last; None (no spec) is every iteration."""
    if spec is None:
        return [(0, None)]
    parts = []
    for item in spec.split(","):
        found = SPEC.fullmatch(item.strip())
        if not found:
            raise StateError(f"--iterations {spec!r}: expected iterations N, ranges A-B or A- separated by commas")
        low = int(found.group(1))
        high = low if found.group(2) is None else (int(found.group(2)) if found.group(2) else None)
        if high is not None and high < low:
            raise StateError(f"--iterations {spec!r}: the range {item.strip()} is empty")
        parts.append((low, high))
    return parts


def chosen(run: Run, parts: list[tuple[int, int | None]]) -> list[int]:
    """The iterations of `run` that the parsed spec names; an iteration named by N or A-B that the run lacks is an
    error (an open range A- takes what the run has)."""
    out: list[int] = []
    for low, high in parts:
        if high is None:
            got = [it for it in sorted(run.history) if it >= low]
            if not got:
                raise StateError(f"{run.folder}: no iteration from {low} on in its history (it has {run.span()})")
        else:
            got = list(range(low, high + 1))
            missing = [it for it in got if it not in run.history]
            if missing:
                raise StateError(f"{run.folder}: no iteration {', '.join(map(str, missing))} in its history "
                                 f"(it has {run.span()})")
        out += [it for it in got if it not in out]
    return out


def interval_level(runs: list[Run]) -> str:
    """"95%" from the runs' params.yaml (eval.interval_level); "interval" where none names one."""
    import yaml

    levels = set()
    for run in runs:
        path = run.folder / "params.yaml"
        if path.is_file():
            level = ((yaml.safe_load(path.read_text()) or {}).get("eval") or {}).get("interval_level")
            if level is not None:
                levels.add(float(level))
    if len(levels) > 1:
        raise StateError(f"the runs' intervals have different levels ({', '.join(f'{x:g}' for x in sorted(levels))}):"
                         " one table cannot head them")
    return f"{levels.pop():.0%}" if levels else "interval"


def cell(row: dict, metric: record.Metric, iteration: int) -> str:
    if metric.interval and iteration == 0 and ("_vs_initial" in metric.name or "_vs_previous" in metric.name):
        return NOT_COMPARED  # iteration 0 has no earlier iteration to be compared with
    point = record.value(row, metric.key)
    if point is None:
        return MISSING
    if not metric.interval:
        return format(point, metric.fmt)
    low, high = record.value(row, metric.key + "_ci_low"), record.value(row, metric.key + "_ci_high")
    mc = record.value(row, metric.key + "_ci_mc") or 0.0  # 0: a history older than the bounds' Monte-Carlo error
    iv = st.Interval(point, math.nan if low is None else low, math.nan if high is None else high, mc)
    return st.interval_text(iv, metric.fmt, metric.null)


def train_cell(row: dict | None, metric: record.TrainMetric) -> str:
    got = record.value(row or {}, metric.key)
    return MISSING if got is None else format(got, metric.fmt)


def per_folder(values: list[str] | None, folders: list[Path], option: str) -> list[str | None]:
    """One value per folder: none given, one for all, or one per folder in order."""
    if not values:
        return [None] * len(folders)
    if len(values) == 1 and option == "--iterations":
        return values * len(folders)
    if len(values) != len(folders):
        raise StateError(f"{len(values)} {option} for {len(folders)} run folders: give one per folder"
                         + (", one for all," if option == "--iterations" else "") + " or none")
    return list(values)


def held_out_columns(metrics: list[str] | None) -> list[record.Metric]:
    """`PER_RUN`, then the registry's held-out metrics named in `metrics`, in the order given."""
    columns = list(record.PER_RUN)
    for name in metrics or []:
        if name not in record.METRICS:
            raise StateError(f"--metric {name}: not one of {', '.join(record.METRICS)}")
        if record.METRICS[name] in columns:
            raise StateError(f"--metric {name}: already a column of the table")
        columns.append(record.METRICS[name])
    return columns


def table(folders: list[Path], labels: list[str] | None = None, iterations: list[str] | None = None,
          train_metrics: list[str] | None = None, metrics: list[str] | None = None) -> str:
    """The held-out table of the runs in `folders`, one row per run and iteration: `PER_RUN`'s columns, then the
    held-out metrics named in `metrics`, then the train_history.csv columns `train_metrics`. iterations: one spec
    (parse_iterations) for every run, or one per run; none: every iteration."""
    columns = held_out_columns(metrics)
    unknown = [k for k in train_metrics or [] if k not in record.TRAIN_METRICS]
    if unknown:
        raise StateError(f"--train-metric {unknown[0]}: not one of {', '.join(record.TRAIN_METRICS)}")
    extra = [record.TRAIN_METRICS[k] for k in train_metrics or []]
    names = per_folder(labels, folders, "--label")
    specs = [parse_iterations(spec) for spec in per_folder(iterations, folders, "--iterations")]
    runs = [load(f, name) for f, name in zip(folders, names)]
    shown = [chosen(r, parts) for r, parts in zip(runs, specs)]  # every run checked before a line is written
    level = interval_level(runs)
    several = len(runs) > 1
    head = (["run"] if several else []) + ["iteration"] + [
        m.label + (f" [{level}]" if m.interval else "") for m in columns] + [m.label for m in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + ("---|" if several else "") + "---:|" * (len(head) - several)]
    for run, its in zip(runs, shown):
        for it in its:
            cells = [cell(run.history[it], m, it) for m in columns]
            cells += [train_cell(run.train.get(it), m) for m in extra]
            lines.append("| " + (f"{run.label} | " if several else "") + f"{it} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
