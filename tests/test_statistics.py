"""rlhf/reports/statistics.py against naive loops and hand-computed examples, and the behaviour of its intervals."""

import random

import numpy as np
import pytest

from rlhf.reports import statistics as st


def naive_bootstrap(values, resamples, seed, level):
    """The same resampling, one resample and one draw at a time, with the percentile taken by hand."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    means = sorted(sum(values[j] for j in row) / len(values) for row in picks)
    def percentile(q):  # numpy's default (linear) interpolation between order statistics
        pos = q * (len(means) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (means[hi] - means[lo]) * (pos - lo)
    tail = (1 - level) / 2
    return sum(values) / len(values), percentile(tail), percentile(1 - tail)


def test_bootstrap_matches_a_naive_loop():
    values = [0.3, -0.1, 0.25, 0.7, 0.0, -0.4, 0.12]
    got = st.bootstrap_mean(values, 500, seed=3, level=0.9)
    assert got == pytest.approx(naive_bootstrap(values, 500, 3, 0.9), abs=1e-12)


def test_bootstrap_is_seeded():
    values = np.random.default_rng(0).normal(size=20)
    assert st.bootstrap_mean(values, 300, 1, 0.95) == st.bootstrap_mean(values, 300, 1, 0.95)
    assert st.bootstrap_mean(values, 300, 1, 0.95) != st.bootstrap_mean(values, 300, 2, 0.95)


def test_interval_contains_the_point_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(7)
    widths = []
    for n in (16, 64, 256, 1024):
        point, low, high = st.bootstrap_mean(rng.normal(0.1, 1.0, size=n), 2000, 0, 0.95)
        assert low <= point <= high
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 4  # ~1/sqrt(n): 8x narrower for 64x the prompts, at least 4x here


def test_interval_excludes_zero_for_a_clearly_better_policy_and_not_for_noise():
    rng = np.random.default_rng(1)
    before = rng.uniform(0.2, 0.6, size=64)
    better = before + rng.normal(0.05, 0.02, size=64)  # same prompts, clearly higher reward
    assert st.bootstrap_mean(better - before, 2000, 0, 0.95)[1] > 0
    assert st.bootstrap_mean(before - before, 2000, 0, 0.95) == (0.0, 0.0, 0.0)  # identical: no change at all
    noise = rng.normal(0, 0.02, size=64)
    _, low, high = st.bootstrap_mean(noise - noise.mean(), 2000, 0, 0.95)  # changes that cancel out on average
    assert low < 0 < high
    wins = st.wins(better, before)
    assert st.bootstrap_mean(wins, 2000, 0, 0.95)[1] > 0.5
    assert st.bootstrap_mean(st.wins(before, before), 2000, 0, 0.95) == (0.5, 0.5, 0.5)


def test_wins_scores_ties_one_half():
    assert st.wins([0.3, 0.2, 0.5, 0.1], [0.1, 0.2, 0.6, 0.1]).tolist() == [1.0, 0.5, 0.0, 0.5]


@pytest.mark.parametrize("bad", [dict(values=[]), dict(values=[[1.0, 2.0]]), dict(resamples=0), dict(level=1.0),
                                 dict(level=0.0)])
def test_bootstrap_rejects_bad_input(bad):
    args = dict(values=[0.1, 0.2], resamples=10, seed=0, level=0.95) | bad
    with pytest.raises(ValueError):
        st.bootstrap_mean(**args)


def test_wins_rejects_unpaired_arrays():
    with pytest.raises(ValueError, match="pair them"):
        st.wins([0.1, 0.2], [0.1])


def test_repetition_by_hand():
    assert st.repeated_ngram_fraction("the cat sat on the mat") == 0.0
    # 10 words, 8 trigrams: (a b c) ×3, (b c a) ×2, (c a b) ×2, (b c d) → 4 unique → 1 − 4/8
    assert st.repeated_ngram_fraction("A b c a b c a B c d") == pytest.approx(1 - 4 / 8)
    assert st.repeated_ngram_fraction("two words") == 0.0  # fewer than 3 words
    assert st.repeated_ngram_fraction("") == 0.0
    assert st.repeated_ngram_fraction("x x x x x") == pytest.approx(1 - 1 / 3)
    assert st.mean_repeated_ngram_fraction(["x x x x x", "a b"]) == pytest.approx((1 - 1 / 3) / 2)
    with pytest.raises(ValueError):
        st.mean_repeated_ngram_fraction([])


def test_distinct_2_by_hand():
    # bigrams: (a b) (b a) (a b) | (a b) (b c) → 3 unique of 5; none spans the two texts
    assert st.distinct_n(["a b a b", "A B\tc"]) == pytest.approx(3 / 5)
    assert st.distinct_n(["b a", "c"]) == 1.0
    assert st.distinct_n(["one", ""]) is None


def naive_repetition(text, n):
    toks = text.lower().split()
    grams = [" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    if not grams:
        return 0.0
    unique = []
    for g in grams:
        if g not in unique:
            unique.append(g)
    return 1 - len(unique) / len(grams)


def test_repetition_and_distinct_match_naive_loops_on_random_texts():
    rng = random.Random(0)
    texts = [" ".join(rng.choice("ab cd ef GH ij".split()) for _ in range(rng.randint(0, 12))) for _ in range(50)]
    for t in texts:
        assert st.repeated_ngram_fraction(t, 3) == pytest.approx(naive_repetition(t, 3))
    pairs = [tuple(t.lower().split()[i:i + 2]) for t in texts for i in range(len(t.split()) - 1)]
    assert st.distinct_n(texts, 2) == pytest.approx(len(set(pairs)) / len(pairs))


def test_the_monte_carlo_error_of_a_bound_matches_its_spread_across_bootstrap_seeds():
    """quantile_mc_error, read from one set of resamples, is ~1.96 standard deviations of the bound over many
    bootstrap seeds (within a factor 1.5 either way)."""
    x = np.random.default_rng(11).normal(0.05, 0.2, size=64)
    got = [st.bootstrap_interval(x, 4000, seed, 0.95) for seed in range(60)]
    spread = np.std([iv.low for iv in got], ddof=1) * 1.96
    mc = np.median([iv.mc for iv in got])
    assert spread / 1.5 < mc < spread * 1.5, (mc, spread)
    assert st.bootstrap_interval(x, 40_000, 0, 0.95).mc < mc / 2  # 10× the resamples: ~√10 × smaller


def test_a_bound_within_its_monte_carlo_error_of_zero_is_borderline():
    """Values shifted so that the lower bound lands on 0 (same seed, same resamples: the bound moves with them) is
    borderline; shifted 3 Monte-Carlo errors further it is not; an exact interval (no MC error) never is."""
    x = np.random.default_rng(2).normal(0.05, 0.2, size=64)
    iv = st.bootstrap_interval(x, 10_000, 0, 0.95)
    on_zero = st.bootstrap_interval(x - iv.low, 10_000, 0, 0.95)
    assert on_zero.low == pytest.approx(0.0, abs=1e-12) and on_zero.borderline()
    assert st.interval_text(on_zero, "+.4f").endswith(" borderline")
    clear = st.bootstrap_interval(x - iv.low + 3 * iv.mc, 10_000, 0, 0.95)
    assert not clear.borderline() and clear.excludes(0.0) and not st.interval_text(clear, "+.4f").endswith("line")
    assert not on_zero.excludes(0.0)
    win = st.bootstrap_interval(st.wins(x, np.zeros(64)), 10_000, 0, 0.95)  # a win rate is judged against 0.5
    assert win.borderline(0.5) == (min(abs(win.low - 0.5), abs(win.high - 0.5)) <= win.mc)
    assert not st.Interval(0.0, 0.0, 0.0, 0.0).borderline()  # nothing changed at all: exact, not borderline


@pytest.mark.parametrize("df, p, want", [(1, 0.975, 12.706204736), (2, 0.975, 4.302652730), (4, 0.975, 2.776445105),
                                         (9, 0.975, 2.262157163), (30, 0.975, 2.042272456), (4, 0.95, 2.131846786)])
def test_t_quantile_against_published_table_values(df, p, want):
    assert st.t_quantile(p, df) == pytest.approx(want, abs=1e-8)


def test_t_interval_and_two_level_bootstrap_by_hand():
    means = [0.05, 0.06, -0.03]
    iv = st.t_interval(means, 0.95)
    m, s = sum(means) / 3, float(np.std(means, ddof=1))
    assert iv[:3] == pytest.approx((m, m - 4.302652730 * s / 3 ** 0.5, m + 4.302652730 * s / 3 ** 0.5), rel=1e-9)
    assert iv.mc == 0.0
    x = np.random.default_rng(0).normal(size=(3, 8))
    two = st.two_level_bootstrap(x, 500, 7, 0.9)
    rng = np.random.default_rng(7)  # the same draws, each resample's mean by a plain loop
    seeds, prompts = rng.integers(0, 3, size=(500, 3)), rng.integers(0, 8, size=(500, 3, 8))
    naive = [np.mean([x[seeds[b, i], prompts[b, i, j]] for i in range(3) for j in range(8)]) for b in range(500)]
    assert two[:3] == pytest.approx((x.mean(), *np.quantile(naive, [0.05, 0.95])), rel=1e-12)
