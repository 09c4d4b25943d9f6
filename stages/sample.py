"""Stage `sample`: this iteration's prompt batch, a deterministic function of (seed, iteration)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stages.common import log, read_state
from stages.params import Params
from stages.schema import ArtifactError, read_artifact, write_artifact


def sample_batch(train: pd.DataFrame, batch_size: int, seed: int, iteration: int) -> pd.DataFrame:
    if len(train) < batch_size:
        raise ArtifactError(f"only {len(train)} training prompts, fewer than rollout.batch_size = {batch_size}")
    rng = np.random.default_rng([seed, iteration])
    rows = np.sort(rng.choice(len(train), size=batch_size, replace=False))
    return train.iloc[rows].reset_index(drop=True)


def run(params: Params) -> None:
    iteration = read_state(params.paths.current)["iteration"]
    train = read_artifact(Path(params.paths.prepared) / "train.parquet", "prompts")
    batch = sample_batch(train, params.rollout.batch_size, params.seed, iteration)
    write_artifact(batch, "prompts", Path(params.paths.iteration) / "batch.parquet")
    log(f"sample: iteration {iteration}, {len(batch)} prompts")
