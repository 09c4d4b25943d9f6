"""The advantages stage's computation: the three per-row frames (rollout, scores, reference) → per-token KL,
shaped rewards, GAE advantages and returns, plus the objective metrics. All math is in rlhf/ppo.py."""

from __future__ import annotations

import math

import pandas as pd
import torch

from rlhf import ppo
from rlhf.config.params import Params


def compute_advantages(rollout: pd.DataFrame, scores: pd.DataFrame, reference: pd.DataFrame, params: Params,
                       kl_coef: float):
    """Returns (per-row advantages frame, objective metrics). float64 throughout: it is cheap and exact.
    kl_coef is this iteration's β (params.kl_coef(state): kl.coef, or the adaptive controller's)."""
    f64 = torch.float64
    logprobs, mask = ppo.pad_ragged(list(rollout["logprobs"]), dtype=f64)  # (B, T)
    mask = mask.to(f64)
    ref_logprobs, _ = ppo.pad_ragged(list(reference["ref_logprobs"]), dtype=f64)  # (B, T)
    values, _ = ppo.pad_ragged(list(reference["values"]), dtype=f64)  # (B, T)
    entropy, _ = ppo.pad_ragged(list(rollout["entropy"]), dtype=f64)  # (B, T)
    # copy=True: pyarrow-backed columns are read-only arrays, which torch warns about on every run
    raw_scores = torch.as_tensor(scores["score"].to_numpy(copy=True), dtype=f64)  # (B,)
    contains_eos = torch.as_tensor(rollout["contains_eos"].to_numpy(copy=True))  # (B,)

    kl = ppo.kl_per_token(logprobs, ref_logprobs, params.kl.estimator) * mask  # (B, T)
    shaped = ppo.penalise_missing_eos(raw_scores, contains_eos, params.shaping.missing_eos_penalty)  # (B,)
    rewards, non_score = ppo.per_token_rewards(shaped, kl, mask, kl_coef if params.kl.in_reward else 0.0)  # (B, T)
    if params.shaping.whiten_rewards:
        rewards = ppo.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = ppo.gae(rewards, values, mask, params.gae.gamma, params.gae.lam)  # (B, T)
    advantage_mean_raw = float(ppo.masked_mean(advantages, mask))  # before whitening, which makes it 0
    if params.gae.whiten_advantages:
        advantages = ppo.masked_whiten(advantages, mask)

    lengths = mask.sum(1).long().tolist()
    cut = lambda x: [row[:n] for row, n in zip(x.tolist(), lengths)]  # noqa: E731 - unpad per row
    out = pd.DataFrame({"prompt_id": rollout["prompt_id"], "score": shaped.float().numpy(), "kl": cut(kl),
                        "rewards": cut(rewards), "advantages": cut(advantages), "returns": cut(returns)})
    non_score_sum = non_score.sum(1)  # (B,)
    metrics = {
        "objective/kl": float(kl.sum(1).mean()),
        "objective/entropy": float(entropy.sum(1).mean()),
        "objective/non_score_reward": float(non_score_sum.mean()),
        "objective/scores": float(raw_scores.mean()),
        "objective/scores_shaped": float(shaped.mean()),
        "objective/rlhf_reward": float((shaped + non_score_sum).mean()),
        "val/num_eos_tokens": int(contains_eos.sum()),
        "val/response_length": float(mask.sum(1).mean()),
        "val/advantage_mean_raw": advantage_mean_raw,
        "val/return_mean": float(ppo.masked_mean(returns, mask)),
        "val/value_mean": float(ppo.masked_mean(values, mask)),
        "objective/kl_coef": float(kl_coef),
    }
    explained = ppo.explained_variance(values, returns, mask)  # of V_old, the critic that made these advantages
    metrics["val/explained_variance"] = explained if math.isfinite(explained) else None
    return out, metrics
