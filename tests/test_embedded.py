"""The embedded default for real: GGUF → safetensors conversion of SmolLM2-135M-Instruct, the MiniLM scorer,
and one tiny PPO iteration (4 prompts, 4 new tokens) in the default dtype (`auto`: bf16 where the CPU computes it
natively, fp32 elsewhere) through `rlhf train` in a temp DVC repo."""

import json

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


def test_one_iteration_learns_something_and_keeps_ratio_one(project):
    update = json.loads((project / "metrics/update.json").read_text())
    assert update["first_minibatch/ratio_max_abs_dev"] <= 1e-5  # same micro-batches as the rollout
    assert update["first_minibatch/approxkl"] < 1e-6
    assert update["policy/approxkl"] > 0
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["iteration"] == 1 and -1 <= evaluation["eval/reward_mean"] <= 1
    objective = json.loads((project / "metrics/objective.json").read_text())
    assert 0 < objective["objective/scores"] <= 1  # cosine similarity to the human summary
    assert "|" in (project / "metrics/samples.md").read_text()


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
