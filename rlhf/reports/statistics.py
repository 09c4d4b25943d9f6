"""Statistics of a held-out evaluation that a reader can trust: reward changes with paired bootstrap intervals, the
win rate against the initial policy, and how repetitive the summaries are. Pure functions (arrays and strings in,
numbers out); rlhf/evaluation.py reads the tables and writes the results.

Intervals are percentile bootstrap intervals over prompts: the held-out prompts are resampled with replacement and
each resample is scored on the same prompts for both policies (paired), so the prompt-to-prompt spread that both
share cancels out. The win rate uses the same bootstrap rather than a Wilson interval because ties score 0.5, which
a binomial interval does not model.

A bootstrap bound is itself an estimate from a finite number of resamples. Its Monte-Carlo error is read off the
same resamples (`quantile_mc_error`); a bound closer than that to the value a claim is about (0 for a change, 0.5
for a win rate) is *borderline*: another bootstrap seed could put it on the other side, so it decides nothing.

Across seeds: `t_interval` over per-seed means (the seeds are a sample of the seeds one could have run) and
`two_level_bootstrap` (resample seeds, then prompts within each drawn seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

MC_Z = 1.96  # the Monte-Carlo band of a bound: ±1.96 standard errors of the bootstrap quantile


class Interval(NamedTuple):
    mean: float
    low: float
    high: float
    mc: float  # Monte-Carlo half-width of the bounds (the larger of the two); 0 for an exact interval

    def borderline(self, null: float = 0.0) -> bool:
        """A bound within its Monte-Carlo error of `null`: whether the interval excludes `null` is a coin flip."""
        return self.mc > 0 and min(abs(self.low - null), abs(self.high - null)) <= self.mc

    def excludes(self, null: float = 0.0) -> bool:
        return not (self.low <= null <= self.high) and not self.borderline(null)


def interval_text(iv: Interval, fmt: str, null: float | None = 0.0) -> str:
    """"+0.0550 [+0.0063, +0.1089]", with " borderline" appended where a bound is within its Monte-Carlo error of
    `null` (the interval then decides nothing about `null`)."""
    point = format(iv.mean, fmt)
    if math.isnan(iv.low):
        return f"{point} [–]"
    text = f"{point} [{iv.low:{fmt}}, {iv.high:{fmt}}]"
    return text + " borderline" if null is not None and iv.borderline(null) else text


def _check(x: np.ndarray, resamples: int, level: float, name: str) -> None:
    if x.size == 0 or x.ndim not in (1, 2):
        raise ValueError(f"{name}: needs a non-empty array of per-prompt values (got shape {x.shape})")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"{name}: resamples must be ≥ 1 and level in (0, 1) (got {resamples}, {level})")


def percentile_interval(point: float, means: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    mc = max(quantile_mc_error(means, tail), quantile_mc_error(means, 1.0 - tail))
    return Interval(float(point), float(low), float(high), mc)


def quantile_mc_error(draws: np.ndarray, q: float) -> float:
    """Half-width of the distribution-free band of the q-quantile of `draws`' distribution: the order statistics
    B·q ± MC_Z·√(B·q(1 − q)) (the count of draws below the true quantile is binomial), halved: about MC_Z standard
    errors of the estimated quantile, read from the draws themselves."""
    x = np.sort(np.asarray(draws, dtype=np.float64))  # (B,)
    b = len(x)
    spread = MC_Z * math.sqrt(b * q * (1.0 - q))
    lo, hi = max(int(math.floor(b * q - spread)), 0), min(int(math.ceil(b * q + spread)), b - 1)
    return float(x[hi] - x[lo]) / 2.0


def bootstrap_interval(values: Sequence[float], resamples: int, seed: int, level: float) -> Interval:
    """The mean of per-prompt values, its percentile bootstrap interval and that interval's Monte-Carlo error."""
    x = np.asarray(values, dtype=np.float64)  # (P,)
    if x.ndim != 1:
        raise ValueError(f"bootstrap_mean: needs a 1-D array of per-prompt values (got shape {x.shape})")
    _check(x, resamples, level, "bootstrap_mean")
    rng = np.random.default_rng(seed)
    means = np.concatenate([x[rng.integers(0, len(x), size=(n, len(x)))].mean(axis=1)  # (n, P) prompt indices
                            for n in _chunks(resamples, len(x))])  # (B,) resample means
    return percentile_interval(float(x.mean()), means, level)


def _chunks(resamples: int, width: int, cells: int = 2_000_000) -> list[int]:
    """Resamples per block, so one block's indices stay near `cells` numbers (the draws are the same as in one
    block: numpy's generator fills them in order)."""
    step = max(1, cells // max(width, 1))
    return [min(step, resamples - start) for start in range(0, resamples, step)]


def bootstrap_mean(values: Sequence[float], resamples: int, seed: int, level: float) -> tuple[float, float, float]:
    """(mean, low, high): the mean of per-prompt values and its percentile bootstrap interval."""
    return tuple(bootstrap_interval(values, resamples, seed, level)[:3])


def two_level_bootstrap(values: np.ndarray, resamples: int, seed: int, level: float) -> Interval:
    """values (S, P): seed s's per-prompt values on the same P prompts. Each resample draws S seeds with
    replacement, then P prompts with replacement within each drawn seed; the statistic is the mean over both. Seed
    to seed spread is then part of the interval, as it is not when the S·P pairs are resampled as one pool."""
    x = np.asarray(values, dtype=np.float64)  # (S, P)
    if x.ndim != 2:
        raise ValueError(f"two_level_bootstrap: needs a (seeds, prompts) array (got shape {x.shape})")
    _check(x, resamples, level, "two_level_bootstrap")
    s, p = x.shape
    rng = np.random.default_rng(seed)
    means = []
    for n in _chunks(resamples, s * p):
        seeds = rng.integers(0, s, size=(n, s))  # (n, S)
        prompts = rng.integers(0, p, size=(n, s, p))  # (n, S, P)
        means.append(x[seeds[:, :, None], prompts].mean(axis=(1, 2)))  # (n,)
    return percentile_interval(float(x.mean()), np.concatenate(means), level)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with df degrees of freedom: the density integrated by Simpson's rule
    on [0, x] (exact to ~1e-10 here) and x found by bisection. numpy has no t distribution."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile: needs 0.5 < p < 1 and df ≥ 1 (got {p}, {df})")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def mass(x: float) -> float:  # P(0 < T < x)
        t = np.linspace(0.0, x, 4001)  # (N,) an even number of intervals
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))  # (N,)
        return float((t[1] - t[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    low, high = 0.0, 1.0
    while mass(high) < p - 0.5:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if mass(mid) < p - 0.5 else (low, mid)
    return (low + high) / 2


def t_interval(values: Sequence[float], level: float) -> Interval:
    """Mean ± t·s/√n over per-seed means (n − 1 degrees of freedom); exact, so no Monte-Carlo error. A single
    seed gives no interval (nan bounds)."""
    x = np.asarray(values, dtype=np.float64)  # (S,)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"t_interval: needs a non-empty 1-D array of per-seed values (got shape {x.shape})")
    if len(x) < 2:
        return Interval(float(x.mean()), math.nan, math.nan, 0.0)
    half = t_quantile(0.5 + level / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return Interval(float(x.mean()), float(x.mean()) - half, float(x.mean()) + half, 0.0)


def wins(rewards: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 if the reward beats the baseline's on the same prompt, 0.5 on a tie, 0 otherwise."""
    r, b = np.asarray(rewards, dtype=np.float64), np.asarray(baseline, dtype=np.float64)  # (P,), (P,)
    if r.shape != b.shape:
        raise ValueError(f"wins: {r.shape} rewards vs {b.shape} baseline rewards (pair them by prompt first)")
    return np.where(r > b, 1.0, np.where(r == b, 0.5, 0.0))  # (P,)


def least_squares_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(slope b, R²) of the least-squares line y ≈ a + b·x. R² is the share of y's variance the line explains: the
    power of a control that subtracts b·Δx (near 0, the control cannot change anything). (0, 0) when x or y does not
    vary."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)  # (P,), (P,)
    b = least_squares_slope(x, y)
    dy = y - y.mean()  # (P,)
    syy = float(dy @ dy)
    dx = x - x.mean()  # (P,)
    return b, 0.0 if syy == 0.0 else b * float(dx @ dy) / syy


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
