"""`rlhf rm-accuracy`: how often the configured reward model agrees with real human preferences on TL;DR.

Data: OpenAI's comparisons (batch13/18, data/tldr/comparisons-batch13-18.parquet). Pairs labelled by several
workers are collapsed by majority vote (ties dropped and counted). Labeller confidence is 1–9 where 1–4 prefer
summary_0 and 6–9 prefer summary_1; its strength is |confidence − 5| (1 = slightly … 4 = definitely), averaged per
pair and rounded.

Reference-based scorers (the embedded similarity scorer) need a human reference for the post: we use the post's
own human TL;DR from validation-1945.parquet, matched by identical prompt text, and drop pairs in which one of
the two summaries *is* that reference (it would score 1.0 trivially). The report says how many pairs remain.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf.artifacts.files import write_json
from rlhf.runtime.log import log
from rlhf.config.params import Params
from rlhf.models.scorers import load_scorer
from rlhf.runtime.device import resolve_device


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def majority_pairs(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One row per (post, unordered summary pair): chosen/rejected by majority, mean confidence strength."""
    rows, ties = [], 0
    key = df.apply(lambda r: (r["post_id"], *sorted([r["summary_0"], r["summary_1"]])), axis=1)
    for (_, a, b), group in df.groupby(key, sort=True):
        votes_a = int((group["chosen"] == a).sum())
        votes_b = len(group) - votes_a
        if votes_a == votes_b:
            ties += 1
            continue
        chosen, rejected = (a, b) if votes_a > votes_b else (b, a)
        first = group.iloc[0]
        rows.append({
            "post_id": first["post_id"], "prompt": first["prompt"], "chosen": chosen, "rejected": rejected,
            "votes": len(group), "strength": int(round(float((group["confidence"] - 5).abs().mean()))),
            "policies": {first["policy_0"], first["policy_1"]},
        })
    return pd.DataFrame(rows), ties


def attach_references(pairs: pd.DataFrame, validation: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    refs = dict(zip(validation["prompt"], validation["completion"]))
    pairs = pairs.assign(reference=pairs["prompt"].map(refs))
    counts = {"dropped_no_reference": int(pairs["reference"].isna().sum())}
    pairs = pairs[pairs["reference"].notna()]
    is_ref = pairs.apply(lambda r: r["reference"].strip() in (r["chosen"].strip(), r["rejected"].strip()), axis=1)
    counts["dropped_reference_in_pair"] = int(is_ref.sum())
    return pairs[~is_ref].reset_index(drop=True), counts


def accuracy_report(pairs: pd.DataFrame, chosen_scores: np.ndarray, rejected_scores: np.ndarray) -> dict:
    correct = chosen_scores > rejected_scores
    k, n = int(correct.sum()), len(correct)
    lo, hi = wilson_interval(k, n)
    out = {"accuracy": k / n if n else math.nan, "ci95_low": lo, "ci95_high": hi, "pairs": n,
           "exact_ties": int((chosen_scores == rejected_scores).sum())}
    for s in sorted(pairs["strength"].unique()):
        m = (pairs["strength"] == s).to_numpy()
        ks, ns = int(correct[m].sum()), int(m.sum())
        lo, hi = wilson_interval(ks, ns)
        out[f"confidence_{s}"] = {"accuracy": ks / ns, "ci95_low": lo, "ci95_high": hi, "pairs": ns}
    return out


def run(params: Params, comparisons: Path, out: Path, limit: int | None = None) -> dict:
    df = pd.read_parquet(comparisons)
    pairs, ties = majority_pairs(df)
    counts = {"comparisons": len(df), "pairs": len(pairs) + ties, "majority_ties_dropped": ties}
    if params.reward_model.kind == "similarity":
        pairs, extra = attach_references(pairs, pd.read_parquet(params.paths.source_data))
        counts.update(extra)
    else:
        pairs = pairs.assign(reference=None)
    if limit:
        pairs = pairs.head(limit)
    device = resolve_device(params.runtime.device, params.reward_model.dtype)
    scorer = load_scorer(Path(params.paths.reward_model), params.reward_model, device)
    queries, refs = list(pairs["prompt"]), list(pairs["reference"])
    chosen = scorer.score(queries, list(pairs["chosen"]), refs)
    rejected = scorer.score(queries, list(pairs["rejected"]), refs)
    report = {"reward_model": params.reward_model.id, "kind": params.reward_model.kind, **counts,
              **accuracy_report(pairs, chosen, rejected)}
    write_json(out, report)
    log(f"rm-accuracy: {report['accuracy']:.3f} (95% CI {report['ci95_low']:.3f}–{report['ci95_high']:.3f}) "
        f"on {report['pairs']} majority-vote pairs; "
        + ", ".join(f"confidence {s}: {report[f'confidence_{s}']['accuracy']:.3f} (n={report[f'confidence_{s}']['pairs']})"
                    for s in sorted(pairs['strength'].unique())))
    return report
