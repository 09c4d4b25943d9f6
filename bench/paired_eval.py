"""Two held-out evaluations side by side, paired by prompt: Δ reward and win rate of B over A with paired bootstrap
intervals, plus each side's reward, EOS rate, repetition, distinct-2 and length, as one Markdown table. For comparing
runs that do not share an iteration 0 (e.g. with and without the SFT warm start): their
`metrics/samples/iter-N.jsonl` or `metrics/samples_initial.jsonl` tables, made on the same held-out prompts.
Formats and the "borderline" mark of an interval are those of the run record (rlhf/artifacts/record.py); reads
JSON only, so it never imports torch.

    python bench/paired_eval.py RUN_A/metrics/samples/iter-0.jsonl RUN_B/metrics/samples/iter-0.jsonl \\
        [-l "A's row label" -l "B's row label"] [--into PAGE.md --block NAME]

With --into, the table is also written between `<!-- NAME:start -->` and `<!-- NAME:end -->` of PAGE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from rlhf.artifacts.record import METRICS
from rlhf.errors import StateError
from rlhf.reports.blocks import replace_block
from rlhf.reports.statistics import (bootstrap_interval, distinct_n, interval_text, mean_repeated_ngram_fraction,
                                     wins)

NOT_COMPARED = "—"  # A against itself


def read_table(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["prompt_id"]): r for r in rows}


def side(rows: list[dict]) -> dict:
    texts = [r["summary"] for r in rows]
    return {"reward": float(np.mean([r["reward"] for r in rows])), "eos": float(np.mean([r["eos"] for r in rows])),
            "repeated_3grams": mean_repeated_ngram_fraction(texts), "distinct_2": distinct_n(texts),
            "length": float(np.mean([r["length"] for r in rows]))}


def table(a: dict[int, dict], b: dict[int, dict], names: tuple[str, str], resamples: int = 2000, seed: int = 0,
          level: float = 0.95) -> str:
    """The Markdown table of A and B on the prompts both hold (they must hold the same ones)."""
    if set(a) != set(b):
        raise StateError(f"the tables hold different prompts ({len(set(a) ^ set(b))} not in both): not pairable")
    ids = sorted(a)
    ra, rb = [a[i]["reward"] for i in ids], [b[i]["reward"] for i in ids]
    delta_m, win_m = METRICS["reward_delta_vs_initial"], METRICS["win_rate_vs_initial"]
    delta = interval_text(bootstrap_interval(np.subtract(rb, ra), resamples, seed, level), delta_m.fmt, delta_m.null)
    win = interval_text(bootstrap_interval(wins(rb, ra), resamples, seed, level), win_m.fmt, win_m.null)
    fmt = {k: METRICS[name].fmt for k, name in (("reward", "reward_mean"), ("eos", "eos_rate"),
                                                 ("repeated_3grams", "repeated_3gram_fraction"),
                                                 ("distinct_2", "distinct_2"), ("length", "length_mean"))}
    lines = [f"| side | reward | Δ reward vs A [{level:.0%}] | win rate vs A [{level:.0%}] | EOS rate | "
             "repeated 3-grams | distinct-2 | length |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for letter, rows, name, compared in (("A", a, names[0], (NOT_COMPARED, NOT_COMPARED)),
                                         ("B", b, names[1], (delta, win))):
        s = side([rows[i] for i in ids])
        lines.append(f"| {letter}: {name} | {s['reward']:{fmt['reward']}} | {compared[0]} | {compared[1]} | "
                     f"{s['eos']:{fmt['eos']}} | {s['repeated_3grams']:{fmt['repeated_3grams']}} | "
                     f"{s['distinct_2']:{fmt['distinct_2']}} | {s['length']:{fmt['length']}} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("-l", "--label", action="append", default=[],
                    help="the row's text, once for A and once for B (default: the files' paths)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--into", type=Path, help="also write the table into this Markdown page's block")
    ap.add_argument("--block", default="paired-table", help="the block's name: <!-- NAME:start --> … end")
    args = ap.parse_args()
    try:
        if args.label and len(args.label) != 2:
            raise StateError(f"{len(args.label)} --label: give one for A and one for B, or none")
        names = tuple(args.label) if args.label else (f"`{args.a}`", f"`{args.b}`")
        text = table(read_table(args.a), read_table(args.b), names, args.resamples, args.seed)
        if args.into:
            args.into.write_text(replace_block(args.into.read_text(), args.block, text, str(args.into)))
    except (StateError, OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(text, end="")


if __name__ == "__main__":
    main()
