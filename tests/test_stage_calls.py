"""Each stage's *call* of its helpers, run through the stage (its `main`, or the report's `run`) on a tiny project.

The helpers have their own tests; these catch a stage that calls a correct helper with the wrong arguments: a
constant iteration or seed for the prompt batch, chosen and rejected swapped where the accuracy report scores them,
the held-out KL's arguments the wrong way round, rollout log-probs at another temperature than the sampler's, a
reference that is the live policy. Each is built so that the bug moves the result far beyond the tolerance: the
expected values are computed here, independently, in float64 from plain forward passes.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import stage_main
from rlhf import project as proj
from rlhf.artifacts.files import write_json
from rlhf.artifacts.schema import read_artifact, write_artifact
from rlhf.models.checkpoint import POLICY_ADAPTER, load_actors, save_adapters
from rlhf.models.sources import load_causal_lm
from test_wiring import base_models, make_params, project_dir, prepare_iteration  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_prompts(n: int, seed: int) -> pd.DataFrame:
    """A `prompts` artifact of n rows with random token ids (what the prepare stage writes)."""
    gen = np.random.default_rng(seed)
    ids = [gen.integers(10, 1000, size=int(gen.integers(4, 9))).tolist() for _ in range(n)]
    return pd.DataFrame({
        "prompt_id": np.arange(100, 100 + n, dtype=np.int64), "subreddit": ["r/test"] * n,
        "prompt": [f"p{i}" for i in range(n)], "query": [f"q{i}" for i in range(n)],
        "reference": [f"r{i}" for i in range(n)], "prompt_ids": ids,
        "prompt_length": np.array([len(p) for p in ids], dtype=np.int32),
    })


# --------------------------------------------------------------------------------------------- sample


def sampled_ids(params, iteration: int) -> list[int]:
    """The prompt ids the sample stage writes when models/current holds `iteration`."""
    write_json(Path(params.paths.current) / "state.json", {"iteration": iteration, "global_step": 0, "kl_coef": 0.1})
    stage_main("sample")(params)
    return read_artifact(Path(params.paths.iteration) / "batch.parquet", "prompts")["prompt_id"].tolist()


def test_sample_stage_draws_another_batch_each_iteration_and_seed(project_dir, tiny_policy, tiny_reward):
    """40 training prompts, batches of 4: over 5 iterations a stage that ignores the iteration writes one batch five
    times; the real one writes 5 batches of which no two are equal (at these sizes two equal draws have odds ~1e-5),
    together covering well over one batch's worth of prompts. The same for the seed."""
    params = make_params(tiny_policy, tiny_reward, rollout={"batch_size": 4})
    write_artifact(synthetic_prompts(40, seed=0), "prompts", Path(params.paths.prepared) / "train.parquet")
    batches = [sampled_ids(params, k) for k in range(5)]
    assert all(len(b) == 4 == len(set(b)) for b in batches)
    distinct = {tuple(b) for b in batches}
    assert len(distinct) == 5, f"iterations 0-4 drew {len(distinct)} distinct batch(es): {batches}"
    assert len(set().union(*batches)) >= 10
    assert sampled_ids(params, 2) == batches[2]  # a function of (seed, iteration): a rerun draws the same batch
    other_seed = make_params(tiny_policy, tiny_reward, rollout={"batch_size": 4}).model_copy(update={"seed": 7})
    assert sampled_ids(other_seed, 2) != batches[2]
