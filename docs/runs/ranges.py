"""The range of each PPO health metric over published runs: a Markdown table of min, median and max over every
iteration of the given `train_history.csv` files (and, for the ratio, of the given `update.json` files).

    python docs/runs/ranges.py docs/runs/seeds-2026-12-06/moments-reset/seed-*/metrics/train_history.csv

docs/guide.md ("What a healthy run looks like") prints this table; a test rebuilds it from the same files.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

# (column of train_history.csv or key of update.json, what the guide calls it)
METRICS = [
    ("policy/approxkl", "approx-KL per token (policy step)"),
    ("policy/clipfrac", "policy clip fraction"),
    ("val/clipfrac", "value clip fraction"),
    ("objective/kl", "rollout KL to the reference (nats per response)"),
    ("objective/entropy", "rollout entropy (nats per response)"),
    ("val/explained_variance", "critic explained variance"),
    ("val/ratio", "mean ratio π/π_old"),
    ("policy/ratio_max_abs_dev", "largest \\|ratio − 1\\|"),
    ("first_minibatch/ratio_max_abs_dev", "first minibatch \\|ratio − 1\\|"),
]


def values(paths: list[Path]) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {key: [] for key, _ in METRICS}
    for path in paths:
        rows = [json.loads(path.read_text())] if path.suffix == ".json" else list(csv.DictReader(path.open()))
        for row in rows:
            for key in found:
                if row.get(key) not in (None, ""):
                    found[key].append(float(row[key]))
    return found


def table(paths: list[Path]) -> str:
    lines = ["| metric | min | median | max | iterations |", "|---|---:|---:|---:|---:|"]
    for key, name in METRICS:
        v = values(paths)[key]
        if v:
            lines.append(f"| {name} (`{key}`) | {min(v):.3g} | {statistics.median(v):.3g} | {max(v):.3g} | {len(v)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(p) for p in sys.argv[1:]]))
