"""Each stage's *call* of its helpers, run through the stage (its `main`, or the report's `run`) on a tiny project.

The helpers have their own tests; these catch a stage that calls a correct helper with the wrong arguments: a
constant iteration or seed for the prompt batch, chosen and rejected swapped where the accuracy report scores them,
the held-out KL's arguments the wrong way round, rollout log-probs at another temperature than the sampler's, a
reference that is the live policy. Each is built so that the bug moves the result far beyond the tolerance: the
expected values are computed here, independently, in float64 from plain forward passes.
"""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, stage_main, tiny_params
from rlhf import project as proj
from rlhf.artifacts.files import write_json
from rlhf.artifacts.schema import read_artifact, write_artifact
from rlhf.config.params import parse_params
from rlhf.models.checkpoint import POLICY_ADAPTER, load_actors, save_adapters
from rlhf.models.scorers import load_scorer
from rlhf.models.sources import load_causal_lm, make_model_available
from rlhf.reports.rm_accuracy import run as rm_accuracy
from rlhf.runtime.device import resolve_device
from test_models import perturb_adapter, project, prompts_and_responses  # noqa: F401 (fixture)
from test_wiring import base_models, make_params, prepare_iteration, project_dir, write_rollout  # noqa: F401 (fixtures)

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
    times; the real one writes 5 batches of which no two are equal (by chance: odds ~1e-4 at these sizes),
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


# --------------------------------------------------------------------------------------------- rm-accuracy


def test_rm_accuracy_scores_the_human_choice_as_chosen(tmp_path, monkeypatch, tiny_policy, tiny_reward):
    """Real TL;DR pairs relabelled from the tiny classifier's own scores: the human `chosen` is its higher-scored
    summary in 6 of 8 pairs (5 of 6 at strength 4, 1 of 2 at strength 1). The report, through `run` with the real
    scorer, must say 0.75; with chosen and rejected swapped where it calls the scorer it would say 0.25."""
    monkeypatch.chdir(tmp_path)
    params = parse_params(tiny_params(tiny_policy, tiny_reward))
    make_model_available(params.reward_model.id, None, Path(params.paths.reward_model), "reward")
    real = pd.read_parquet(ROOT / "data/tldr/comparisons-batch13-18.parquet")
    real = real.drop_duplicates("post_id").head(24).reset_index(drop=True)
    scorer = load_scorer(Path(params.paths.reward_model), params.reward_model,
                         resolve_device(params.runtime.device, params.reward_model.dtype))
    s0 = scorer.score(list(real["prompt"]), list(real["summary_0"]), [None] * len(real))
    s1 = scorer.score(list(real["prompt"]), list(real["summary_1"]), [None] * len(real))
    apart = np.abs(s0 - s1) > 1e-3  # batched and one-by-one scores agree to 1e-4: no pair's order can flip
    real, higher_is_1 = real[apart].head(8).reset_index(drop=True), (s1 > s0)[apart][:8]
    assert len(real) == 8
    agrees = np.array([True, True, True, True, True, False, True, False])  # the human choice = the higher score
    strength = np.array([4, 4, 4, 4, 4, 4, 1, 1])
    choice = np.where(agrees, higher_is_1, ~higher_is_1).astype(int)  # 1: summary_1 chosen
    real["chosen"] = np.where(choice == 1, real["summary_1"], real["summary_0"])
    real["confidence"] = np.where(choice == 1, 5 + strength, 5 - strength)  # 1-4 prefer summary_0, 6-9 summary_1
    real.to_parquet("comparisons.parquet")

    report = rm_accuracy(params, Path("comparisons.parquet"), Path("rm.json"))
    assert report["pairs"] == 8 and report["exact_ties"] == 0
    assert report["accuracy"] == pytest.approx(0.75), f"accuracy {report['accuracy']}, built to be 0.75"
    assert report["confidence_4"]["accuracy"] == pytest.approx(5 / 6)
    assert report["confidence_1"]["accuracy"] == pytest.approx(1 / 2)


# --------------------------------------------------------------------------------------------- held-out KL

KL_RTOL = 1e-4


def tempered_logprobs(lm, prompt: list, response: list, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) at the positions that predict each response token, (R, V) float64, from one plain
    forward pass of a causal LM over prompt + response."""
    at = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
    with torch.no_grad():
        return torch.log_softmax(lm(input_ids=torch.tensor([prompt + response])).logits[0, at].double() / temperature,
                                 dim=-1)


def naive_kls(policy_lm, reference_lm, prompt: list, response: list, temperature: float) -> tuple[float, float]:
    """Σ_t KL(π ‖ π_ref) and Σ_t KL(π_ref ‖ π) along one response, in float64."""
    lp, lq = (tempered_logprobs(lm, prompt, response, temperature) for lm in (policy_lm, reference_lm))
    return float((lp.exp() * (lp - lq)).sum()), float((lq.exp() * (lq - lp)).sum())


def naive_token_logprobs(lm, prompt: list, response: list, temperature: float) -> np.ndarray:
    """log π(a_t | s_t) of each response token at `temperature`, float64."""
    lp = tempered_logprobs(lm, prompt, response, temperature)
    return lp[torch.arange(len(response)), torch.tensor(response)].numpy()


def test_held_out_kl_is_policy_to_reference(project, tiny_policy, tiny_reward):
    """The evaluation's KL (sampler's log-probs, reference over the responses on its cached prompt keys/values) on a
    trained-looking adapter at eval.temperature 0.05: tempered this sharply, the two distributions at a position
    are far apart and KL(π ‖ π_ref) and KL(π_ref ‖ π) differ by 7% or more on every response (at the default 0.7
    by some 1e-4 to 4e-4), > 10 × the tolerance. Checked against the first from plain float64 passes, the reference a
    separately loaded base."""
    from rlhf.evaluation import held_out_responses

    params = parse_params(tiny_params(tiny_policy, tiny_reward, eval={
        "temperature": 0.05, "greedy": False, "samples_per_prompt": 2, "generation_chunk": 3,
        "reference_cache": "cache"}))
    actors = load_actors(params, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer, n=3)
    prompts = [p[: 15 + 7 * i] for i, p in enumerate(prompts)]
    rows = [0, 0, 1, 1, 2, 2]
    responses, kls = held_out_responses(params, actors, prompts, [prompts[i] for i in rows], rows)

    base = load_causal_lm(Path(params.paths.policy_model), "float32")
    actors.use(POLICY_ADAPTER)
    naive = np.array([naive_kls(actors.model, base, prompts[i], r, 0.05) for i, r in zip(rows, responses)])
    forward, reverse = naive[:, 0], naive[:, 1]
    assert np.min(np.abs(reverse - forward) / forward) > 10 * KL_RTOL  # the test can tell the two directions apart
    np.testing.assert_allclose(kls, forward, rtol=KL_RTOL)


# --------------------------------------------------------------------------------------------- rollout


def test_rollout_stores_the_policys_logprobs_at_the_sampling_temperature(project_dir, tiny_policy, tiny_reward):
    """The rollout stage on a trained-looking adapter at rollout.temperature 0.3 (the held-out one stays 0.7): the
    stored log-probs must be those of the stored responses under the policy's logits / 0.3, from plain float64
    passes, to 1e-4. Without the division, or at 0.7, they are off by tenths of a nat."""
    params = make_params(tiny_policy, tiny_reward, rollout={"temperature": 0.3, "batch_size": 4, "max_new_tokens": 6})
    proj.init(params, evaluate_baseline=False, track=False)
    current = Path(params.paths.current)
    actors = load_actors(params, current, trainable=False, with_critic=False)
    perturb_adapter(actors)
    save_adapters(actors.model, current, [POLICY_ADAPTER])
    write_artifact(synthetic_prompts(4, seed=1), "prompts", Path(params.paths.iteration) / "batch.parquet")
    stage_main("rollout")(params)

    rollout = read_artifact(Path(params.paths.iteration) / "rollout.parquet", "rollout")
    actors.use(POLICY_ADAPTER)
    for prompt, response, stored in zip(rollout["prompt_ids"], rollout["response_ids"], rollout["logprobs"]):
        want = naive_token_logprobs(actors.model, list(prompt), list(response), 0.3)
        np.testing.assert_allclose(stored, want, rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------- reference


def test_reference_stage_scores_the_initial_policy_after_an_update(project_dir, tiny_policy, tiny_reward):
    """Iteration 0 is saved aside; a real update (lr 0.05, 2 epochs) moves the adapter and is advanced to; the
    reference stage then scores a fresh rollout of the updated policy. Its log-probs must be the initial policy's,
    from plain float64 passes, to 1e-4, and differ from the updated policy's by over 100 × that on every token (here
    0.03 to 0.4): a reference that is the live policy would match the wrong one."""
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 2, "num_minibatches": 1},
                         optim={"lr": 5e-2, "reset_moments": False}, rollout={"batch_size": 4})
    proj.init(params, evaluate_baseline=False, track=False)
    current = Path(params.paths.current)
    shutil.copytree(current, project_dir / "initial")
    prepare_iteration(params, seed=5)
    stage_main("update")(params)
    proj.advance(params, track=False)
    write_rollout(params, seed=6)
    stage_main("reference")(params)

    rollout = read_artifact(Path(params.paths.iteration) / "rollout.parquet", "rollout")
    reference = read_artifact(Path(params.paths.iteration) / "reference.parquet", "reference")
    initial = load_actors(params, project_dir / "initial", trainable=False, with_critic=False)
    updated = load_actors(params, current, trainable=False, with_critic=False)
    gaps = []
    for prompt, response, stored in zip(rollout["prompt_ids"], rollout["response_ids"], reference["ref_logprobs"]):
        args = (list(prompt), list(response), params.rollout.temperature)
        np.testing.assert_allclose(stored, naive_token_logprobs(initial.model, *args), rtol=0, atol=1e-4)
        gaps.extend(np.abs(np.asarray(stored) - naive_token_logprobs(updated.model, *args)))
    assert np.min(gaps) > 1e-2, f"the update moved log π by only {np.min(gaps):.2e} on some token"


# --------------------------------------------------------------------------------------------- prepare: the held-out split


def held_out_ids(params) -> tuple[list[int], list[int]]:
    stage_main("prepare")(params)
    read = lambda name: sorted(read_artifact(Path(params.paths.prepared) / name, "prompts")["prompt_id"].tolist())
    return read("eval.parquet"), read("train.parquet")


def test_prepare_stage_holds_out_by_split_seed_not_seed(project_dir, tiny_policy, tiny_reward):
    """60 real posts, 4 held out. Another `seed` (another run of the same configuration) keeps the held-out prompts,
    so seeds are judged on the same prompts; another data.split_seed draws other ones (the same 4 again by chance:
    odds below 1e-5)."""
    source = Path(make_params(tiny_policy, tiny_reward).paths.source_data)
    source.parent.mkdir(parents=True)
    pd.read_parquet(ROOT / "data/tldr/validation-1945.parquet").head(60).to_parquet(source)
    base = make_params(tiny_policy, tiny_reward)
    with_seeds = lambda seed, split_seed: base.model_copy(
        update={"seed": seed, "data": base.data.model_copy(update={"split_seed": split_seed})})
    held_out, train = held_out_ids(with_seeds(1, 42))
    assert len(held_out) == 4 and len(train) > 40 and not set(held_out) & set(train)
    assert held_out_ids(with_seeds(2, 42)) == (held_out, train)
    other, _ = held_out_ids(with_seeds(1, 7))
    assert len(other) == 4 and other != held_out


# --------------------------------------------------------------------------------------------- update: optimizer moments


def update_outputs(params, project_dir: Path, name: str) -> dict:
    """Run the update stage from models/current; keep and return every tensor it wrote to models/next."""
    from safetensors.torch import load_file

    stage_main("update")(params)
    kept = project_dir / name
    shutil.copytree(Path(params.paths.next), kept)
    return {f"{p.relative_to(kept)}:{k}": v for p in sorted(kept.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_update_stage_resets_the_moments_only_when_asked(project_dir, tiny_policy, tiny_reward):
    """Iteration 1 of a tiny project whose models/current carries iteration 0's AdamW moments (2 steps). With
    optim.reset_moments the update must write exactly what an update with a fresh optimizer writes (here: the same
    stage with the saved moments moved away), every tensor equal, its step count 2; carrying the moments, the step
    count is 4 and the adapter lands elsewhere (lr 0.05: by over 1e-3 on some weight)."""
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 2, "num_minibatches": 1},
                         optim={"lr": 5e-2, "reset_moments": False}, rollout={"batch_size": 4})
    proj.init(params, evaluate_baseline=False, track=False)
    prepare_iteration(params, seed=5)
    stage_main("update")(params)
    proj.advance(params, track=False)
    prepare_iteration(params, seed=6)
    saved = Path(params.paths.current) / "optimizer"
    assert saved.is_dir()

    reset = update_outputs(params.model_copy(update={"optim": params.optim.model_copy(
        update={"reset_moments": True})}), project_dir, "reset")
    carried = update_outputs(params, project_dir, "carried")
    saved.rename(project_dir / "moments")
    fresh = update_outputs(params, project_dir, "fresh")

    assert reset.keys() == fresh.keys() == carried.keys()
    for key in reset:
        assert torch.equal(reset[key], fresh[key]), key
    steps = lambda out: {int(v.item()) for k, v in out.items() if k.endswith("::step")}
    assert steps(reset) == {2} and steps(carried) == {4}
    adapter = [k for k in reset if k.startswith("policy/") and "lora" in k]
    assert adapter, sorted(reset)
    gap = max(float((reset[k] - carried[k]).abs().max()) for k in adapter)
    assert gap > 1e-3, f"carried and reset moments moved the adapter to within {gap:.2e}"
