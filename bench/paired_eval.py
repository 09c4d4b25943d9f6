"""Two held-out evaluations side by side, paired by prompt: Δ reward and win rate of B over A with paired bootstrap
95% intervals, plus each side's EOS rate, repetition, distinct-2 and length. For comparing runs that do not share an
iteration 0 (e.g. with and without the SFT warm start): their `metrics/samples/iter-N.jsonl` or
`metrics/samples_initial.jsonl` tables, made on the same held-out prompts.

    python bench/paired_eval.py RUN_A/metrics/samples/iter-0.jsonl RUN_B/metrics/samples/iter-0.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from rlhf.reports.statistics import bootstrap_mean, distinct_n, mean_repeated_ngram_fraction, wins


def read_table(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {int(r["prompt_id"]): r for r in rows}


def side(rows: list[dict]) -> dict:
    texts = [r["summary"] for r in rows]
    return {"reward": float(np.mean([r["reward"] for r in rows])), "eos": float(np.mean([r["eos"] for r in rows])),
            "repeated_3grams": mean_repeated_ngram_fraction(texts), "distinct_2": distinct_n(texts),
            "length": float(np.mean([r["length"] for r in rows]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    a, b = read_table(args.a), read_table(args.b)
    if set(a) != set(b):
        raise SystemExit(f"the tables hold different prompts ({len(set(a) ^ set(b))} not in both): not pairable")
    ids = sorted(a)
    ra, rb = [a[i]["reward"] for i in ids], [b[i]["reward"] for i in ids]
    delta = bootstrap_mean(np.subtract(rb, ra), args.resamples, args.seed, 0.95)
    win = bootstrap_mean(wins(rb, ra), args.resamples, args.seed, 0.95)
    print(f"{len(ids)} prompts paired; B vs A: Δ reward {delta[0]:+.4f} [{delta[1]:+.4f}, {delta[2]:+.4f}], "
          f"win rate {win[0]:.2f} [{win[1]:.2f}, {win[2]:.2f}] (paired bootstrap 95%, ties count half)")
    print("| side | reward | EOS rate | repeated 3-grams | distinct-2 | length |\n|---|---:|---:|---:|---:|---:|")
    for name, table, path in (("A", a, args.a), ("B", b, args.b)):
        s = side([table[i] for i in ids])
        print(f"| {name}: `{path}` | {s['reward']:.4f} | {s['eos']:.2f} | {s['repeated_3grams']:.3f} | "
              f"{s['distinct_2']:.3f} | {s['length']:.1f} |")


if __name__ == "__main__":
    main()
