"""Stage `sample`: this iteration's prompt batch, a deterministic function of (seed, iteration). No torch: it starts
fast and never goes through the warm process."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    from pathlib import Path

    from rlhf.artifacts.files import read_state
    from rlhf.artifacts.schema import read_artifact, write_artifact
    from rlhf.data.prompts import sample_batch
    from rlhf.runtime.log import log

    iteration = read_state(params.paths.current)["iteration"]
    train = read_artifact(Path(params.paths.prepared) / "train.parquet", "prompts")
    batch = sample_batch(train, params.rollout.batch_size, params.seed, iteration)
    write_artifact(batch, "prompts", Path(params.paths.iteration) / "batch.parquet")
    log(f"sample: iteration {iteration}, {len(batch)} prompts")


if __name__ == "__main__":
    run_stage(main, warm=False)
