"""Stage `reference`: log-probs of the frozen reference (the policy with its adapter disabled, or a separate model)
and V_old from the critic, per response token, in the rollout's micro-batches."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    from pathlib import Path

    import pandas as pd

    from rlhf.artifacts.schema import check_token_ids, read_artifact, write_artifact
    from rlhf.models.checkpoint import load_actors
    from rlhf.models.passes import score_references
    from rlhf.runtime.device import resolve_device
    from rlhf.runtime.distributed import init_distributed
    from rlhf.runtime.log import log

    rollout_path = Path(params.paths.iteration) / "rollout.parquet"
    rollout = read_artifact(rollout_path, "rollout")
    device = resolve_device(params.runtime.device, params.policy_model.dtype)
    dist = init_distributed(device, params.runtime.peer_timeout)
    actors = load_actors(params, Path(params.paths.current), trainable=False, device=device)
    check_token_ids(rollout, rollout_path, actors.vocab_size)
    ref_logprobs, values = score_references(actors, rollout, params.rollout.temperature, dist)
    del actors
    device.free()
    if not dist.is_main:
        return
    out = pd.DataFrame({"prompt_id": rollout["prompt_id"], "ref_logprobs": ref_logprobs, "values": values})
    write_artifact(out, "reference", Path(params.paths.iteration) / "reference.parquet")
    log(f"reference: {len(out)} rows of reference log-probs and values")


if __name__ == "__main__":
    run_stage(main)
