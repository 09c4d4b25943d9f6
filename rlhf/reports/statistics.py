"""Statistics of a held-out evaluation that a reader can trust: reward changes with paired bootstrap intervals, the
win rate against the initial policy, and how repetitive the summaries are. Pure functions (arrays and strings in,
numbers out); rlhf/evaluation.py reads the tables and writes the results.

Intervals are percentile bootstrap intervals over prompts: the held-out prompts are resampled with replacement and
each resample is scored on the same prompts for both policies (paired), so the prompt-to-prompt spread that both
share cancels out. The win rate uses the same bootstrap rather than a Wilson interval because ties score 0.5, which
a binomial interval does not model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_mean(values: Sequence[float], resamples: int, seed: int, level: float) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-prompt values and its percentile bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)  # (P,)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"bootstrap_mean: needs a non-empty 1-D array of per-prompt values (got shape {x.shape})")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_mean: resamples must be ≥ 1 and level in (0, 1) (got {resamples}, {level})")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(x), size=(resamples, len(x)))  # (S, P) prompt indices
    means = x[picks].mean(axis=1)  # (S,)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(x.mean()), float(low), float(high)


def wins(rewards: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 if the reward beats the baseline's on the same prompt, 0.5 on a tie, 0 otherwise."""
    r, b = np.asarray(rewards, dtype=np.float64), np.asarray(baseline, dtype=np.float64)  # (P,), (P,)
    if r.shape != b.shape:
        raise ValueError(f"wins: {r.shape} rewards vs {b.shape} baseline rewards (pair them by prompt first)")
    return np.where(r > b, 1.0, np.where(r == b, 0.5, 0.0))  # (P,)


def least_squares_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """The slope b of the least-squares line y ≈ a + b·x; 0 when x does not vary (no line to fit)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)  # (P,), (P,)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"least_squares_slope: needs two 1-D arrays of one length (got {x.shape}, {y.shape})")
    dx = x - x.mean()  # (P,)
    sxx = float(dx @ dx)
    return 0.0 if sxx == 0.0 else float(dx @ (y - y.mean())) / sxx


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """1 − unique n-grams / n-grams of one text: 0 for no repeat; a summary looping on one phrase tends to 1."""
    grams = ngrams(words(text), n)
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def mean_repeated_ngram_fraction(texts: Sequence[str], n: int = 3) -> float:
    if not texts:
        raise ValueError("mean_repeated_ngram_fraction: no texts")
    return float(np.mean([repeated_ngram_fraction(t, n) for t in texts]))


def distinct_n(texts: Sequence[str], n: int = 2) -> float | None:
    """Unique n-grams / n-grams over all texts together (n-grams never span two texts); None if there are none."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else None
