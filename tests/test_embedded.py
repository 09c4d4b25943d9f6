"""The embedded default for real: GGUF → safetensors conversion of SmolLM2-135M-Instruct, the MiniLM scorer,
and one tiny PPO iteration (4 prompts, 4 new tokens) in the default dtype (`auto`: bf16 where the CPU computes it
natively, fp32 elsewhere) through `rlhf train` in a temp DVC repo."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_project, run

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["data"].update({"eval_size": 2})
    p["rollout"].update({"batch_size": 4, "max_new_tokens": 4, "micro_batch_size": 2})
    p["ppo"].update({"epochs": 1, "num_minibatches": 2})
    p["eval"].update({"max_new_tokens": 4})
    repo = make_project(tmp_path_factory.mktemp("embedded") / "repo", p, source_rows=12)
    run(["rlhf", "train", "--iterations", "1"], repo)
    return repo


def test_conversion_produces_a_plain_safetensors_llama(project):
    folder = project / "models/base/policy"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (folder / "model.safetensors").stat().st_size > 200e6  # dequantised float weights
    assert (project / "models/base/reward/model.safetensors").exists()


def test_one_iteration_starts_at_ratio_one_and_writes_its_metrics(project):
    update = json.loads((project / "metrics/update.json").read_text())
    assert update["first_minibatch/ratio_max_abs_dev"] <= 1e-5  # same micro-batches as the rollout
    assert update["first_minibatch/approxkl"] < 1e-6
    assert update["policy/approxkl"] > 0
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["iteration"] == 1 and -1 <= evaluation["eval/reward_mean"] <= 1
    objective = json.loads((project / "metrics/objective.json").read_text())
    assert 0 < objective["objective/scores"] <= 1  # cosine similarity to the human summary
    assert "|" in (project / "metrics/samples.md").read_text()


def test_the_update_moved_the_real_policy_along_the_advantages_and_the_values_toward_the_returns(project, monkeypatch):
    """What "learned something" means for one PPO iteration on the real 135M model: rescored with the trained
    state (models/next), the batch's surrogate gain Σ_t A_t·(ρ_t − 1) is positive (more probability on tokens with
    positive advantage, less on negative) and the critic's squared error to the returns is lower than V_old's."""
    import numpy as np

    from rlhf.artifacts.schema import read_iteration
    from rlhf.config.params import load_params
    from rlhf.models.checkpoint import load_actors
    from rlhf.models.passes import critic_values, per_token_columns, policy_logprobs

    monkeypatch.chdir(project)  # params' paths are relative to the project
    params = load_params("params.yaml")
    rollout, reference, advantages = read_iteration("data/iteration", ("rollout", "reference", "advantages"))
    actors = load_actors(params, Path(params.paths.next), trainable=False)
    new_logprobs, new_values = per_token_columns(
        actors, rollout, lambda packed: (policy_logprobs(actors, packed, params.rollout.temperature)[0],  # (b, R)
                                         critic_values(actors, packed)))  # (b, R)
    flat = lambda column: np.concatenate([np.asarray(row, dtype=np.float64) for row in column])  # noqa: E731
    a, ret = flat(advantages["advantages"]), flat(advantages["returns"])
    ratio = np.exp(flat(new_logprobs) - flat(rollout["logprobs"]))
    assert np.abs(ratio - 1).max() > 0  # the policy moved at all
    assert float(a @ (ratio - 1)) > 0, "the update lowered the surrogate"
    old_error = np.mean((flat(reference["values"]) - ret) ** 2)
    new_error = np.mean((flat(new_values) - ret) ** 2)
    assert new_error < old_error, (old_error, new_error)


def test_similarity_reward_is_the_cosine_of_unpadded_mean_embeddings(project):
    """Batched and padded as the reward stage scores, against one text at a time with no padding; and the reward
    orders a paraphrase of the reference above an unrelated summary."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from rlhf.config.params import load_params
    from rlhf.models.scorers import SimilarityScorer
    from rlhf.runtime.device import resolve_device

    params = load_params(project / "params.yaml")
    scorer = SimilarityScorer(project / "models/base/reward", params.reward_model, resolve_device("cpu", "float32"))
    references = [" my landlord kept the whole deposit", " we broke up after two years together",
                  " my landlord kept the whole deposit"]
    responses = [" The landlord refused to return my deposit.", " the cat sat on the mat", " x"]
    got = scorer.score(["q"] * 3, responses, references)

    def embedding(text: str) -> torch.Tensor:
        ids = scorer.tokenizer(text.strip(), return_tensors="pt")
        with torch.no_grad():
            return F.normalize(scorer.model(**ids).last_hidden_state[0].float().mean(0), dim=-1)

    want = [float(embedding(a) @ embedding(b)) for a, b in zip(responses, references)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got[0] > 0.5 > got[1] and got[0] > got[2]
