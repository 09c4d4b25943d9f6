"""Stage `evaluate`: the updated policy (models/next) on the fixed held-out prompts: reward, KL to the reference,
length, EOS rate and a sample table (rlhf/evaluation.py)."""

from __future__ import annotations

from rlhf.runtime.stage import run_stage


def main(params) -> None:
    from rlhf.evaluation import evaluate

    evaluate(params)


if __name__ == "__main__":
    run_stage(main)
