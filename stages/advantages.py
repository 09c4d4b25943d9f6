"""Stage `advantages`: KL-shaped per-token rewards, GAE and returns (all math in rlhf/ppo.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    from pathlib import Path

    import numpy as np

    from rlhf.artifacts.files import read_state, write_json
    from rlhf.artifacts.schema import read_iteration, write_artifact
    from rlhf.runtime.log import log
    from rlhf.training.advantages import compute_advantages

    it = Path(params.paths.iteration)
    rollout, scores, reference = read_iteration(it, ("rollout", "scores", "reference"))
    if not np.isfinite(scores["score"].to_numpy()).all():
        raise FloatingPointError(f"{it / 'scores.parquet'}: non-finite reward score; refusing to compute advantages")
    kl_coef = params.kl_coef(read_state(params.paths.current))
    out, metrics = compute_advantages(rollout, scores, reference, params, kl_coef)
    write_artifact(out, "advantages", it / "advantages.parquet")
    write_json(Path(params.paths.metrics) / "objective.json", metrics)
    log(f"advantages: score {metrics['objective/scores']:.4f}, KL {metrics['objective/kl']:.4f}, "
        f"rlhf_reward {metrics['objective/rlhf_reward']:.4f}, KL coef {kl_coef:.4g}")


if __name__ == "__main__":
    run_stage(main)
