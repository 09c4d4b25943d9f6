"""Stage `reward`: one scalar score per response from the frozen reward model (see stages/rewards.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from stages.common import log
from stages.distributed import init_distributed
from stages.params import Params
from stages.rewards import load_scorer
from stages.schema import read_artifact, write_artifact


def run(params: Params) -> None:
    rollout = read_artifact(Path(params.paths.iteration) / "rollout.parquet", "rollout")
    dist = init_distributed()
    scorer = load_scorer(Path(params.paths.reward_model), params.reward_model)
    scores = scorer.score(list(rollout["query"]), list(rollout["response_text"]), list(rollout["reference"]), dist)
    if not dist.is_main:
        return
    write_artifact(pd.DataFrame({"prompt_id": rollout["prompt_id"], "score": scores}), "scores",
                   Path(params.paths.iteration) / "scores.parquet")
    log(f"reward: mean score {scores.mean():.4f} over {len(scores)} responses")
