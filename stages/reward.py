"""Stage `reward`: one scalar score per response from the frozen reward model (see rlhf/models/scorers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    from pathlib import Path

    import pandas as pd

    from rlhf.artifacts.schema import read_artifact, write_artifact
    from rlhf.models.scorers import load_scorer
    from rlhf.runtime.device import resolve_device
    from rlhf.runtime.distributed import init_distributed
    from rlhf.runtime.log import log

    rollout = read_artifact(Path(params.paths.iteration) / "rollout.parquet", "rollout")
    device = resolve_device(params.runtime.device, params.reward_model.dtype)
    dist = init_distributed(device, params.runtime.peer_timeout)
    scorer = load_scorer(Path(params.paths.reward_model), params.reward_model, device)  # the only model held here
    scores = scorer.score(list(rollout["query"]), list(rollout["response_text"]), list(rollout["reference"]), dist)
    del scorer
    device.free()
    if not dist.is_main:
        return
    write_artifact(pd.DataFrame({"prompt_id": rollout["prompt_id"], "score": scores}), "scores",
                   Path(params.paths.iteration) / "scores.parquet")
    log(f"reward: mean score {scores.mean():.4f} over {len(scores)} responses")


if __name__ == "__main__":
    run_stage(main)
