"""Wiring of the stage code: that the update, advantages and state hand-over use the PPO math the right way round.

The math in rlhf/ppo.py has its own tests against naive loops (tests/test_ppo.py); these catch what those cannot: a
policy loss of the wrong sign in the update, the KL's arguments swapped in the advantages, AdamW moments not carried
between iterations, a learning rate or KL coefficient that does not follow its schedule across iterations. The
stages run in this process (their `main`), on the tiny random Qwen3 from the fixtures and synthetic batches.
"""

import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import full_params, stage_main, tiny_params
from rlhf import project as proj
from rlhf.artifacts.files import read_json, read_state, write_json
from rlhf.artifacts.schema import read_artifact, write_artifact
from rlhf.config.params import ParamsError, parse_params
from rlhf.models.checkpoint import OPTIMIZER_DIR, load_actors, load_optimizer
from rlhf.models.passes import critic_values, length_sorted_groups, policy_logprobs, score_references, score_responses
from rlhf.models.sources import make_model_available
from rlhf.runtime.distributed import Dist
from rlhf.training import ppo_update
from rlhf.training.advantages import compute_advantages


def f32(x) -> list[float]:
    """Values a float32 parquet column holds exactly, so the naive loops see what the code reads."""
    return np.asarray(x, dtype=np.float32).astype(np.float64).tolist()


# --------------------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_models(tmp_path_factory, tiny_policy, tiny_reward) -> Path:
    folder = tmp_path_factory.mktemp("wiring-base")
    params = parse_params(tiny_params(tiny_policy, tiny_reward))
    make_model_available(params.policy_model.id, None, folder / "policy", "policy")
    return folder


def make_params(tiny_policy, tiny_reward, **sections):
    p = tiny_params(tiny_policy, tiny_reward, **sections)
    p["runtime"]["warm_start"] = False
    return parse_params(p)


@pytest.fixture
def project_dir(tmp_path, monkeypatch, base_models) -> Path:
    """An empty project folder (the cwd) whose policy_model path holds the tiny policy."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "policy").symlink_to(base_models / "policy")
    return tmp_path


def synthetic_rows(n: int, seed: int) -> pd.DataFrame:
    gen = np.random.default_rng(seed)
    prompts = [gen.integers(10, 1000, size=int(gen.integers(4, 9))).tolist() for _ in range(n)]
    responses = [gen.integers(10, 1000, size=int(gen.integers(2, 6))).tolist() for _ in range(n)]
    return pd.DataFrame({
        "prompt_id": np.arange(n, dtype=np.int64), "micro_batch": length_sorted_groups(
            [len(p) + len(r) for p, r in zip(prompts, responses)], 2),
        "query": [f"q{i}" for i in range(n)], "reference": [f"r{i}" for i in range(n)], "prompt_ids": prompts,
        "response_ids": responses, "response_text": ["" for _ in range(n)],
        "response_length": [len(r) for r in responses], "contains_eos": [i % 3 != 0 for i in range(n)],
    })


def synthetic_frames(n: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rollout, scores and reference frames with random per-token numbers (no model)."""
    gen = np.random.default_rng(seed)
    rollout = synthetic_rows(n, seed)
    lengths = rollout["response_length"]
    rollout["logprobs"] = [f32(gen.normal(-2.0, 1.0, k)) for k in lengths]
    rollout["entropy"] = [f32(gen.uniform(0.5, 3.0, k)) for k in lengths]
    scores = pd.DataFrame({"prompt_id": rollout["prompt_id"], "score": f32(gen.normal(0.0, 1.0, n))})
    reference = pd.DataFrame({"prompt_id": rollout["prompt_id"],
                              "ref_logprobs": [f32(np.asarray(lp) + gen.normal(0, 0.5, len(lp)))
                                               for lp in rollout["logprobs"]],
                              "values": [f32(gen.normal(0.0, 1.0, k)) for k in lengths]})
    return rollout, scores, reference


def write_rollout(params, seed: int) -> None:
    """This iteration's rollout.parquet: synthetic prompts/responses, log-probs of the current policy (π_old)."""
    rollout = synthetic_rows(params.rollout.batch_size, seed)
    actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
    rollout["logprobs"], rollout["entropy"] = score_responses(actors, rollout, params.rollout.temperature)
    write_artifact(rollout, "rollout", Path(params.paths.iteration) / "rollout.parquet")


def write_scores(params, seed: int) -> None:
    rollout = read_artifact(Path(params.paths.iteration) / "rollout.parquet", "rollout")
    gen = np.random.default_rng(seed)
    scores = pd.DataFrame({"prompt_id": rollout["prompt_id"], "score": gen.normal(0.0, 1.0, len(rollout))})
    write_artifact(scores, "scores", Path(params.paths.iteration) / "scores.parquet")


def prepare_iteration(params, seed: int) -> None:
    """rollout (ours) → reference stage → scores (ours) → advantages stage, from models/current."""
    write_rollout(params, seed)
    stage_main("reference")(params)
    write_scores(params, seed)
    stage_main("advantages")(params)


# --------------------------------------------------------------------------------------------- one PPO step


def one_step_setup(params):
    """Iteration 0 of a tiny project and one minibatch of 8 synthetic rows scored by it: A = +1 on every token of
    even rows and −1 on odd ones, every return 0.5 above its value. Returns (actors, frame, groups, named, opts)."""
    proj.init(params, evaluate_baseline=False, track=False)
    actors = load_actors(params, Path(params.paths.current), trainable=True)
    df = synthetic_rows(8, seed=1)
    df["logprobs"], _ = score_responses(actors, df, params.rollout.temperature)
    df["ref_logprobs"], df["values"] = score_references(actors, df, params.rollout.temperature)
    sign = np.where(df["prompt_id"] % 2 == 0, 1.0, -1.0)
    df["advantages"] = [[s] * n for s, n in zip(sign, df["response_length"])]
    df["returns"] = [[v + 0.5 for v in row] for row in df["values"]]
    groups = ppo_update.build_groups(df, actors.device.where)
    named = ppo_update.trainable_parameters(actors)
    opts = (ppo_update.make_optimizer(named[0], params.optim.lr, params, actors.device),
            ppo_update.make_optimizer(named[1], params.optim.critic_lr, params, actors.device))
    return actors, df, groups, named, opts


def test_one_ppo_step_follows_the_advantage_and_moves_values_toward_returns(project_dir, tiny_policy, tiny_reward):
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 1, "num_minibatches": 1},
                         optim={"lr": 1e-2, "critic_lr": 1e-3}, rollout={"batch_size": 8, "micro_batch_size": 2})
    actors, df, groups, named, opts = one_step_setup(params)
    sign = np.where(df["prompt_id"] % 2 == 0, 1.0, -1.0)  # as one_step_setup set the advantages

    history = ppo_update.ppo_epochs(actors, groups, params, opts, named, 0, Dist(), kl_coef=params.kl.coef)
    assert len(history) == 1 and history[0]["policy/ratio_max_abs_dev"] < 1e-5  # π = π_old at the step

    rows = [list(g.index) for _, g in df.groupby("micro_batch", sort=True)]
    gap_before = gap_after = value_rise = 0.0
    for g, members in zip(groups, rows):
        with torch.no_grad():
            new_lp = policy_logprobs(actors, g.packed, params.rollout.temperature)[0]  # (b, R)
            new_v = critic_values(actors, g.packed)  # (b, R)
        m = g.mask
        row_change = ((new_lp - g.old_logprobs) * m).sum(1) / m.sum(1)  # mean Δ log π per row
        for j, i in enumerate(members):
            if sign[i] > 0:
                assert row_change[j] > 0, f"row {i} (A > 0): log π fell by {-row_change[j]:.2e}"
            else:
                assert row_change[j] < 0, f"row {i} (A < 0): log π rose by {row_change[j]:.2e}"
        value_rise += float(((new_v - g.old_values) * m).sum())
        gap_before += float(((g.old_values - g.returns).abs() * m).sum())
        gap_after += float(((new_v - g.returns).abs() * m).sum())
    assert value_rise > 0 and gap_after < gap_before  # values rose toward returns 0.5 above them


@pytest.mark.parametrize("in_reward", [True, False])
def test_minibatch_gradients_equal_those_of_the_losses_written_out(project_dir, tiny_policy, tiny_reward, in_reward):
    """Off-policy (old log-probs and values perturbed, so both clips are active) with different policy and value
    clip ranges: the update's accumulated gradients equal those of the PPO losses written out from the papers,
    normalised by the minibatch's token count; with kl.in_reward false, + β·k3 KL as a loss term."""
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 1, "num_minibatches": 1, "clip_eps": 0.1,
                                                        "clip_eps_value": 0.3, "vf_coef": 0.7},
                         kl={"coef": 0.3, "estimator": "k3" if not in_reward else "k1", "in_reward": in_reward},
                         rollout={"batch_size": 8, "micro_batch_size": 2})
    actors, _, groups, named, _ = one_step_setup(params)
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        g.old_logprobs = g.old_logprobs + 0.4 * torch.randn(g.old_logprobs.shape, generator=gen) * g.mask
        g.old_values = g.old_values + 0.5 * torch.randn(g.old_values.shape, generator=gen) * g.mask
        # at iteration 0 π = π_ref, where the KL and its gradient vanish: a reference apart from π
        g.ref_logprobs = g.ref_logprobs + 0.3 * torch.randn(g.ref_logprobs.shape, generator=gen) * g.mask
    n_tokens = sum(float(g.mask.sum()) for g in groups)
    sums = ppo_update.minibatch_losses(actors, groups, params, "test", n_tokens, kl_coef=0.3)
    assert float(sums["policy/clipfrac"]) > 0 and float(sums["val/clipfrac"]) > 0  # both clips were active
    got = [{k: p.grad.clone() for k, p in part.items() if p.grad is not None} for part in named]
    for part in named:
        for p in part.values():
            p.grad = None

    policy_loss = value_loss = 0.0
    ratios, clipped_tokens, ratio_dev = [], 0.0, 0.0
    for g in groups:
        m = g.mask  # (b, R)
        logprobs = policy_logprobs(actors, g.packed, params.rollout.temperature)[0]  # (b, R)
        ratio = torch.exp(logprobs - g.old_logprobs)
        per_token = torch.maximum(-g.advantages * ratio, -g.advantages * ratio.clamp(1 - 0.1, 1 + 0.1))
        with torch.no_grad():
            real = m.bool()
            ratios += ratio[real].tolist()
            ratio_dev = max(ratio_dev, float((ratio[real] - 1).abs().max()))
            clipped_tokens += float(((-g.advantages * ratio.clamp(0.9, 1.1) > -g.advantages * ratio) & real).sum())
        policy_loss = policy_loss + (per_token * m).sum() / n_tokens
        if not in_reward:  # k3 = π_ref/π − 1 − log(π_ref/π)
            log_ref_ratio = g.ref_logprobs - logprobs
            policy_loss = policy_loss + 0.3 * ((torch.exp(log_ref_ratio) - 1 - log_ref_ratio) * m).sum() / n_tokens
        values = critic_values(actors, g.packed)  # (b, R)
        clipped = g.old_values + (values - g.old_values).clamp(-0.3, 0.3)
        per_token_v = 0.5 * torch.maximum((values - g.returns) ** 2, (clipped - g.returns) ** 2)
        value_loss = value_loss + 0.7 * (per_token_v * m).sum() / n_tokens
    (policy_loss + value_loss).backward()
    stats = ppo_update.finish_stats({k: float(v) for k, v in sums.items()})
    r = np.array(ratios)
    assert stats["val/ratio"] == pytest.approx(r.mean(), rel=1e-5)
    assert stats["val/ratio_var"] == pytest.approx(r.var(), rel=1e-3, abs=1e-7)  # E[ρ²] − E[ρ]², over tokens
    assert stats["policy/clipfrac"] == pytest.approx(clipped_tokens / n_tokens)
    assert stats["policy/ratio_max_abs_dev"] == pytest.approx(ratio_dev, rel=1e-5)
    for part, grads in zip(named, got):
        assert grads.keys() == {k for k, p in part.items() if p.grad is not None} and grads
        for k, p in part.items():
            if k in grads:
                torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("poison", ["policy loss", "value loss", "policy gradient", "critic gradient"])
def test_a_non_finite_loss_or_gradient_stops_the_update_naming_it(project_dir, tiny_policy, tiny_reward, poison):
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 1, "num_minibatches": 1},
                         rollout={"batch_size": 8, "micro_batch_size": 2})
    actors, _, groups, named, opts = one_step_setup(params)
    nan = float("nan")
    first = {"policy": next(iter(named[0].values())), "critic": next(iter(named[1].values()))}
    if poison == "policy loss":
        first["policy"].data.fill_(nan)
    elif poison == "value loss":
        actors.value_head.weight.data.fill_(nan)
    else:  # the losses stay finite; only the gradient reaching one tensor is not
        first[poison.split()[0]].register_hook(lambda grad: torch.full_like(grad, nan))
    with pytest.raises(FloatingPointError, match=f"update: non-finite {poison} at iteration 0, epoch 0, minibatch 0 "
                                                 r"\(step 0\); nothing written to models/next"):
        ppo_update.ppo_epochs(actors, groups, params, opts, named, 0, Dist(), kl_coef=params.kl.coef)


def test_entropy_bonus_alone_raises_the_entropy(project_dir, tiny_policy, tiny_reward):
    """With zero advantages the only policy gradient is the entropy bonus's: it must carry gradient."""
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 1, "num_minibatches": 1, "entropy_coef": 1.0},
                         optim={"lr": 1e-2})
    proj.init(params, evaluate_baseline=False, track=False)
    actors = load_actors(params, Path(params.paths.current), trainable=True)
    df = synthetic_rows(4, seed=2)
    df["logprobs"], entropy_before = score_responses(actors, df, params.rollout.temperature)
    df["ref_logprobs"], df["values"] = score_references(actors, df, params.rollout.temperature)
    df["advantages"] = [[0.0] * n for n in df["response_length"]]
    df["returns"] = df["values"]
    named = ppo_update.trainable_parameters(actors)
    opts = (ppo_update.make_optimizer(named[0], params.optim.lr, params, actors.device),
            ppo_update.make_optimizer(named[1], params.optim.critic_lr, params, actors.device))
    ppo_update.ppo_epochs(actors, ppo_update.build_groups(df, actors.device.where), params, opts, named, 0, Dist(),
                          kl_coef=params.kl.coef)
    _, entropy_after = score_responses(actors, df, params.rollout.temperature)
    assert sum(map(sum, entropy_after)) > sum(map(sum, entropy_before))


# --------------------------------------------------------------------------------------------- advantages


def naive_advantages(rollout, scores, reference, params, kl_coef):
    """compute_advantages written as plain float64 loops over rows and tokens, from the formulas."""
    kl_fn = {"k1": lambda lp, ref: lp - ref, "k2": lambda lp, ref: 0.5 * (lp - ref) ** 2,
             "k3": lambda lp, ref: math.exp(ref - lp) - 1 - (ref - lp)}[params.kl.estimator]
    beta = kl_coef if params.kl.in_reward else 0.0
    penalty = params.shaping.missing_eos_penalty
    kls, rewards, shaped = [], [], []
    for lp_row, ref_row, score, eos in zip(rollout["logprobs"], reference["ref_logprobs"], scores["score"],
                                           rollout["contains_eos"]):
        kl = [kl_fn(a, b) for a, b in zip(lp_row, ref_row)]
        s = score - penalty if penalty is not None and not eos else score
        r = [-beta * k for k in kl]
        r[-1] += s
        kls.append(kl), rewards.append(r), shaped.append(s)
    non_score = [sum(-beta * k for k in kl) for kl in kls]
    if params.shaping.whiten_rewards:  # scale only: the mean is kept
        flat = np.array([x for r in rewards for x in r])
        mean, std = flat.mean(), math.sqrt(flat.var(ddof=1) + 1e-8)
        rewards = [[(x - mean) / std + mean for x in r] for r in rewards]
    gamma, lam = params.gae.gamma, params.gae.lam
    advantages, returns = [], []
    for r, v in zip(rewards, reference["values"]):
        n, a, last = len(r), [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            delta = r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t]
            last = delta + gamma * lam * last
            a[t] = last
        advantages.append(a), returns.append([x + y for x, y in zip(a, v)])
    raw_mean = float(np.mean([x for a in advantages for x in a]))
    if params.gae.whiten_advantages:
        flat = np.array([x for a in advantages for x in a])
        mean, std = flat.mean(), math.sqrt(flat.var(ddof=1) + 1e-8)
        advantages = [[(x - mean) / std for x in a] for a in advantages]
    return kls, rewards, shaped, non_score, advantages, returns, raw_mean


SWITCHES = [
    (whiten_rewards, whiten_advantages, penalty, in_reward, estimator)
    for whiten_rewards, whiten_advantages, penalty in itertools.product([False, True], [False, True], [None, 1.5])
    for in_reward, estimator in [(True, "k1"), (True, "k2"), (True, "k3"), (False, "k2"), (False, "k3")]
]


@pytest.mark.parametrize("whiten_rewards,whiten_advantages,penalty,in_reward,estimator", SWITCHES)
def test_compute_advantages_matches_naive_loop(whiten_rewards, whiten_advantages, penalty, in_reward, estimator):
    params = parse_params(full_params(kl={"coef": 0.3, "estimator": estimator, "in_reward": in_reward},
                                      shaping={"missing_eos_penalty": penalty, "whiten_rewards": whiten_rewards},
                                      gae={"gamma": 0.9, "lam": 0.8, "whiten_advantages": whiten_advantages}))
    rollout, scores, reference = synthetic_frames(7, seed=3)
    out, metrics = compute_advantages(rollout, scores, reference, params, 0.3)
    kls, rewards, shaped, non_score, advantages, returns, raw_mean = naive_advantages(rollout, scores, reference,
                                                                                      params, 0.3)
    for col, expected in (("kl", kls), ("rewards", rewards), ("advantages", advantages), ("returns", returns)):
        for i, row in enumerate(expected):
            np.testing.assert_allclose(out[col][i], row, rtol=1e-9, atol=1e-9, err_msg=f"{col}, row {i}")
    np.testing.assert_allclose(out["score"], shaped, rtol=1e-6)
    assert metrics["objective/kl"] == pytest.approx(np.mean([sum(k) for k in kls]), rel=1e-9)
    assert metrics["objective/non_score_reward"] == pytest.approx(np.mean(non_score), rel=1e-9, abs=1e-12)
    assert metrics["objective/rlhf_reward"] == pytest.approx(np.mean(np.add(shaped, non_score)), rel=1e-9)
    assert metrics["objective/kl_coef"] == 0.3
    v = np.array([x for row in reference["values"] for x in row])
    ret = np.array([x for row in returns for x in row])
    assert metrics["val/advantage_mean_raw"] == pytest.approx(raw_mean, rel=1e-9, abs=1e-12)  # before whitening
    assert metrics["objective/scores"] == pytest.approx(np.mean(scores["score"]), rel=1e-6)  # before the penalty
    assert metrics["objective/scores_shaped"] == pytest.approx(np.mean(shaped), rel=1e-6)
    assert metrics["objective/entropy"] == pytest.approx(np.mean([sum(e) for e in rollout["entropy"]]), rel=1e-9)
    assert metrics["val/num_eos_tokens"] == int(rollout["contains_eos"].sum())
    assert metrics["val/response_length"] == pytest.approx(rollout["response_length"].mean())
    assert metrics["val/return_mean"] == pytest.approx(ret.mean(), rel=1e-9)
    assert metrics["val/value_mean"] == pytest.approx(v.mean(), rel=1e-9)
    assert metrics["val/explained_variance"] == pytest.approx(1 - np.var(ret - v) / np.var(ret), rel=1e-9)


@pytest.mark.parametrize("target", [None, 6.0])
def test_advantages_stage_takes_the_kl_coefficient_from_the_state(project_dir, tiny_policy, tiny_reward, target):
    params = make_params(tiny_policy, tiny_reward, kl={"coef": 0.05, "target": target})
    rollout, scores, reference = synthetic_frames(6, seed=4)
    it = Path(params.paths.iteration)
    for frame, kind in ((rollout, "rollout"), (scores, "scores"), (reference, "reference")):
        write_artifact(frame, kind, it / f"{kind}.parquet")
    write_json(Path(params.paths.current) / "state.json", {"iteration": 3, "global_step": 6, "kl_coef": 0.4})
    stage_main("advantages")(params)
    beta = 0.05 if target is None else 0.4  # without the controller the state's β is not used
    assert read_json(Path(params.paths.metrics) / "objective.json")["objective/kl_coef"] == beta
    out = read_artifact(it / "advantages.parquet", "advantages")
    _, rewards, *_ = naive_advantages(rollout, scores, reference, params, beta)
    for i, row in enumerate(rewards):
        np.testing.assert_allclose(out["rewards"][i], row, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- across iterations


def trained_state(params, state_dir: Path) -> dict:
    """Every trainable tensor and its AdamW moments, as the update stage would resume them from `state_dir`."""
    actors = load_actors(params, state_dir, trainable=True)
    named = ppo_update.trainable_parameters(actors)
    out = {}
    for label, group, lr in (("policy", named[0], params.optim.lr), ("critic", named[1], params.optim.critic_lr)):
        opt = ppo_update.make_optimizer(group, lr, params, actors.device)
        load_optimizer(opt, group, state_dir / OPTIMIZER_DIR / f"{label}.safetensors")
        for name, p in group.items():
            moments = {k: torch.as_tensor(v).detach().clone().float() for k, v in opt.state.get(p, {}).items()}
            out[f"{label}:{name}"] = (p.detach().clone(), moments)
    return out


def test_two_iterations_with_carried_moments_equal_one_continuous_run(project_dir, tiny_policy, tiny_reward):
    """One update of 2 epochs over a batch ≡ two iterations of 1 epoch over the same batch, with the state (weights
    and AdamW moments) saved and restored in between. Only the order in which micro-batch gradients are summed
    differs (the shuffle is seeded by iteration), hence a float32-roundoff tolerance."""
    common = dict(ppo={"num_minibatches": 1}, optim={"lr": 1e-2, "critic_lr": 1e-2, "reset_moments": False})
    one_epoch = make_params(tiny_policy, tiny_reward, **{**common, "ppo": {"epochs": 1, "num_minibatches": 1}})
    two_epochs = make_params(tiny_policy, tiny_reward, **{**common, "ppo": {"epochs": 2, "num_minibatches": 1}})
    proj.init(one_epoch, evaluate_baseline=False, track=False)
    current, nxt = Path(one_epoch.paths.current), Path(one_epoch.paths.next)
    prepare_iteration(one_epoch, seed=5)
    shutil.copytree(current, project_dir / "start")

    stage_main("update")(two_epochs)
    shutil.copytree(nxt, project_dir / "continuous")
    continuous = trained_state(one_epoch, project_dir / "continuous")

    stage_main("update")(one_epoch)
    proj.advance(one_epoch, track=False)
    stage_main("update")(one_epoch)  # iteration 1, same batch, resumed from the saved state
    assert read_state(nxt)["iteration"] == 2 and read_state(nxt)["global_step"] == 2
    split = trained_state(one_epoch, nxt)

    start = trained_state(one_epoch, project_dir / "start")
    assert continuous.keys() == split.keys() and len(continuous) > 0
    moved = 0
    for name, (weight, moments) in continuous.items():
        weight_split, moments_split = split[name]
        torch.testing.assert_close(weight_split, weight, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved += not torch.equal(weight, start[name][0])
        assert moments.keys() == moments_split.keys() and {"exp_avg", "exp_avg_sq", "step"} <= moments.keys()
        for key in moments:
            torch.testing.assert_close(moments_split[key], moments[key], rtol=1e-4, atol=1e-9,
                                       msg=lambda m: f"{name} {key}: {m}")
        assert float(moments["step"]) == 2
    assert moved > len(continuous) // 2  # the comparison is about trained tensors, not untouched ones


def naive_lr_factor(iteration: int, warmup: int, total: int) -> float:
    """Linear warmup to 1 over `warmup` iterations, then cosine decay to 0 at `total`."""
    if iteration < warmup:
        return (iteration + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / (total - warmup)))


def test_lr_and_kl_coefficient_follow_their_schedules_across_iterations(project_dir, tiny_policy, tiny_reward):
    warmup, total, lr, critic_lr = 1, 4, 1e-2, 2e-3
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 1, "num_minibatches": 1},
                         optim={"lr": lr, "critic_lr": critic_lr, "schedule": "cosine", "warmup_iterations": warmup,
                                "total_iterations": total},
                         kl={"coef": 0.1, "target": 0.05, "horizon": 10})
    factors = [naive_lr_factor(k, warmup, total) for k in range(total)]
    linear = [(k + 1) / (warmup + 1) if k < warmup else 1 - (k - warmup) / (total - warmup) for k in range(total)]
    assert not np.allclose(factors, linear)  # the run can tell cosine from linear
    proj.init(params, evaluate_baseline=False, track=False)
    beta = 0.1
    metrics = Path(params.paths.metrics)
    for k in range(total):
        prepare_iteration(params, seed=10 + k)
        assert read_json(metrics / "objective.json")["objective/kl_coef"] == pytest.approx(beta, rel=1e-12)
        stage_main("update")(params)
        update = read_json(metrics / "update.json")
        assert update["iteration"] == k
        assert update["lr"] == pytest.approx(lr * factors[k], rel=1e-9), f"iteration {k}"
        assert update["critic_lr"] == pytest.approx(critic_lr * factors[k], rel=1e-9), f"iteration {k}"
        adv = read_artifact(Path(params.paths.iteration) / "advantages.parquet", "advantages")
        kl = float(np.mean([sum(row) for row in adv["kl"]]))
        if k > 0:
            assert kl != 0  # the policy has moved from the reference: the controller sees a real error
        error = min(max(kl / 0.05 - 1, -0.2), 0.2)
        beta = beta * (1 + error * params.rollout.batch_size / 10)
        assert read_state(params.paths.next)["kl_coef"] == pytest.approx(beta, rel=1e-9), f"iteration {k}"
        proj.advance(params, track=False)
    history = pd.read_csv(metrics / "train_history.csv")
    np.testing.assert_allclose(history["lr"], [lr * f for f in factors], rtol=1e-9)
    with pytest.raises(ParamsError, match=r"^optim\.total_iterations: iteration 4 "):
        stage_main("update")(params)  # past the horizon the learning rate would be 0


@pytest.mark.parametrize("max_norm", [None, 1.0, 100.0])
def test_clip_and_step_clips_the_joint_gradient_norm_and_reports_it_unclipped(max_norm):
    """Each optimizer's parameters are clipped by their own joint norm (policy and critic apart)."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)  # joint norm sqrt(25 + 144) = 13
    c = torch.nn.Parameter(torch.zeros(2))
    c.grad = torch.tensor([0.0, 2.0])
    opts = [torch.optim.SGD([a, b], lr=1.0), torch.optim.SGD([c], lr=1.0)]
    norms = ppo_update.clip_and_step(opts, [{"a": a, "b": b}, {"c": c}], max_norm, ["policy", "critic"], "test")
    assert norms == pytest.approx([13.0, 2.0])
    step = torch.cat([a.detach().ravel(), b.detach().ravel()]).norm()  # SGD with lr 1 moves by the used gradient
    assert float(step) == pytest.approx(min(13.0, max_norm or math.inf), rel=1e-5)
    assert float(c.detach().norm()) == pytest.approx(min(2.0, max_norm or math.inf), rel=1e-5)
    assert a.grad is None and b.grad is None and c.grad is None  # zeroed for the next step
