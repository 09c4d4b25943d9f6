"""Stage `evaluate`: the updated policy (models/next) on the fixed held-out prompts: reward, KL to the reference,
length, EOS rate and a sample table (rlhf/evaluation.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    from rlhf.evaluation import evaluate

    evaluate(params)


if __name__ == "__main__":
    run_stage(main)
