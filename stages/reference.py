"""Stage `reference`: log-probs of the frozen reference (the policy with its adapter disabled, or a separate model)
and V_old from the critic, per response token, in the rollout's micro-batches."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from stages.common import log
from stages.distributed import init_distributed
from stages.modeling import critic_values, load_actors, pack, reference_logprobs
from stages.params import Params
from stages.schema import read_artifact, write_artifact


def run(params: Params) -> None:
    rollout = read_artifact(Path(params.paths.iteration) / "rollout.parquet", "rollout")
    dist = init_distributed()
    actors = load_actors(params, Path(params.paths.current), trainable=False)
    local = {}
    for _, group in dist.mine(list(rollout.groupby("micro_batch", sort=True))):
        packed = pack(list(group["prompt_ids"]), list(group["response_ids"]))
        with torch.no_grad():
            ref = reference_logprobs(actors, packed, params.rollout.temperature)  # (b, R)
            v = critic_values(actors, packed)  # (b, R)
        for j, i in enumerate(group.index):
            n = int(rollout.at[i, "response_length"])
            local[i] = (ref[j, :n].tolist(), v[j, :n].tolist())
    merged = dist.merge(local)
    if not dist.is_main:
        return
    ref_logprobs, values = [merged[i][0] for i in range(len(rollout))], [merged[i][1] for i in range(len(rollout))]
    out = pd.DataFrame({"prompt_id": rollout["prompt_id"], "ref_logprobs": ref_logprobs, "values": values})
    write_artifact(out, "reference", Path(params.paths.iteration) / "reference.parquet")
    log(f"reference: {len(out)} rows of reference log-probs and values")
