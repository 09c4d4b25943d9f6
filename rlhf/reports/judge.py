"""An independent judge of held-out summaries: ROUGE-1/2/L F-measure against the human TL;DR, computed with Google's
reference implementation (`rouge-score`, Porter stemming on). The policy never trains on it, so a reward gain that
ROUGE does not share is a sign the reward is being gamed rather than the summaries improving.

Pure functions: texts in, numbers out (rlhf/evaluation.py calls them and writes the results)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}  # our column → rouge-score's name


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES.values()), use_stemmer=True)


def rouge(summaries: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """Per summary, the ROUGE-1/2/L F-measure against its reference: {"rouge_1": (N,), "rouge_2": (N,), "rouge_l": (N,)}.
    An empty summary or reference scores 0."""
    if len(summaries) != len(references):
        raise ValueError(f"rouge: {len(summaries)} summaries vs {len(references)} references (one each)")
    scores = [_scorer().score(str(ref), str(summary)) for summary, ref in zip(summaries, references)]  # (target, prediction)
    return {ours: np.array([s[theirs].fmeasure for s in scores], dtype=np.float64) for ours, theirs in ROUGE_TYPES.items()}


def disagreement(reward_delta: tuple | None, judge_delta: tuple | None) -> int | None:
    """+1 when the reward's change interval lies above 0 and the judge's below 0 (the reward rose while the judge saw
    worse summaries: possible reward hacking); −1 for the reverse; 0 when they do not contradict each other; None
    when either comparison is missing. Each argument is (point, low, high[, Monte-Carlo error])."""
    if reward_delta is None or judge_delta is None or None in (*reward_delta[:3], *judge_delta[:3]):
        return None
    (_, r_low, r_high), (_, j_low, j_high) = reward_delta[:3], judge_delta[:3]
    if r_low > 0 and j_high < 0:
        return 1
    if r_high < 0 and j_low > 0:
        return -1
    return 0


def disagreement_warning(flag: int | float | None, judge: str = "ROUGE-L") -> str | None:
    """The words for a `disagreement` flag, or None when there is nothing to warn about."""
    if flag is None or flag != flag or flag == 0:  # flag != flag: NaN read back from a CSV
        return None
    if flag > 0:
        return (f"WARNING: the training reward rose while the independent judge ({judge}) fell, both beyond their "
                "intervals: possible reward hacking")
    return (f"WARNING: the independent judge ({judge}) rose while the training reward fell, both beyond their "
            "intervals: the reward model disagrees with the judge")
