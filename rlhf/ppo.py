"""All PPO math, pure: tensors in, tensors out. No I/O, no Hugging Face imports.

Notation follows Schulman et al. (2017) and the N+ implementation details of RLHF with PPO on TL;DR.
B = batch (responses), T = response tokens (padded); `mask` is 1 on real response tokens (up to and including the
first EOS) and 0 on padding. Nothing here looks at token ids, so pad == EOS cannot hide a real EOS.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)  # Bessel's correction, as in TRL/N+
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Zero-mean, unit-variance over the valid entries; padding stays 0.

    shift_mean=False keeps the mean (used for rewards: shifting them would change what "good" means)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from samples of π (Schulman, "Approximating KL divergence")."""
    log_ratio = logprobs - ref_logprobs  # (B, T) log π/π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # r = π_ref/π; (r - 1) - log r ≥ 0, unbiased and low variance.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def kl_full(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) from two logit tensors (..., V); returns (...)."""
    return kl_from_logprobs(torch.log_softmax(logits, dim=-1), torch.log_softmax(ref_logits, dim=-1))


def kl_from_logprobs(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Exact KL(p ‖ q) from normalised log-probabilities (..., V); returns (...)."""
    return (logp.exp() * (logp - logq)).sum(-1)  # (B, T)


def penalise_missing_eos(scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """TRL's rule: a response that never emitted EOS loses `penalty` from its score."""
    if penalty is None:
        return scores
    return torch.where(contains_eos, scores, scores - penalty)  # (B,)


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = −β·KL_t on every token, plus the sequence score on the last real token.

    Returns (rewards, non_score_rewards), both (B, T) and zero on padding."""
    non_score = -kl_coef * kl * mask  # (B, T)
    lengths = mask.sum(1).long()  # (B,)
    last = (lengths - 1).clamp(min=0)  # (B,)
    rewards = non_score.clone()
    has_tokens = lengths > 0
    rows = torch.arange(scores.shape[0], device=scores.device)[has_tokens]
    rewards[rows, last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, non_score


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation. The value after the last real token is 0 (the episode ends).

    A_t = δ_t + γλ A_{t+1},  δ_t = r_t + γ V_{t+1} − V_t;  returns R_t = A_t + V_t."""
    rewards = rewards * mask  # (B, T)
    values = values * mask  # (B, T)
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)  # (B, T)
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last_gae)  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        last_gae = delta + gamma * lam * last_gae
        advantages[:, t] = last_gae
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # (B, T) per-token clipped surrogate, not yet reduced
    ratio: torch.Tensor  # (B, T)
    clipped: torch.Tensor  # (B, T) bool: the clipped branch was active
    approxkl: torch.Tensor  # (B, T) ½ (log ratio)²
    dual_clipped: torch.Tensor  # (B, T) bool: the dual-clip bound −c·A was active (all False without dual clip)


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_eps: float,
    dual_clip: float | None = None,
) -> PolicyLoss:
    """max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) per token, ρ = π/π_old.

    dual_clip = c > 1 (Ye et al. 2020, "dual-clip PPO"): where A < 0 the loss is also capped at −c·A, i.e.
    min(max(−A·ρ, −A·clip(ρ)), −c·A). Without it a token with A < 0 and a huge ρ (a stale sample the policy now
    likes) has an unbounded loss; capped, its gradient is 0 beyond ρ = c."""
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    loss = torch.maximum(unclipped, clipped)  # (B, T)
    dual = torch.zeros_like(loss, dtype=torch.bool)  # (B, T)
    if dual_clip is not None:
        bound = -dual_clip * advantages  # (B, T)
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    return PolicyLoss(loss, ratio, clipped > unclipped, 0.5 * log_ratio**2, dual)


def entropy_loss(entropy: torch.Tensor, mask: torch.Tensor, coef: float, n_tokens: float) -> torch.Tensor:
    """−coef · Σ_valid H_t / n_tokens: the entropy bonus as a loss term (n_tokens normalises it like the policy
    loss, by the whole minibatch's token count). `entropy` must carry gradient for the bonus to act."""
    return -coef * masked_sum(entropy, mask) / n_tokens


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[R − V] / Var[R] over valid tokens: 1 is a perfect critic, 0 one no better than a constant, < 0
    worse than a constant. NaN when the returns do not vary (nothing to explain)."""
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return math.nan
    return float(1.0 - masked_var(returns - values, mask) / var_returns)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. (2019) proportional controller: β ← β·(1 + clip(KL/KL_target − 1, −0.2, 0.2)·n_steps/horizon).

    `kl` is the batch's mean per-response KL, `n_steps` the responses it was measured on; the clip bounds how far
    one noisy batch can move β."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


class ValueLoss(NamedTuple):
    loss: torch.Tensor  # (B, T) ½ max((V−R)², (clip(V)−R)²)
    clipped: torch.Tensor  # (B, T) bool


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip_eps_value: float
) -> ValueLoss:
    v_clipped = old_values + torch.clamp(values - old_values, -clip_eps_value, clip_eps_value)  # (B, T)
    loss_unclipped = (values - returns) ** 2  # (B, T)
    loss_clipped = (v_clipped - returns) ** 2  # (B, T)
    return ValueLoss(0.5 * torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped)


def lr_multiplier(iteration: int, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate factor for a 0-based PPO iteration (the schedule steps once per iteration)."""
    if warmup > 0 and iteration < warmup:
        return (iteration + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def pad_ragged(rows: list, fill: float = 0.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length sequences into (B, T) plus a 0/1 mask of the real entries."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=dtype)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)  # (B, T)
    for i, r in enumerate(rows):
        n = len(r)
        if n:
            out[i, :n] = torch.as_tensor(list(r), dtype=dtype)
            mask[i, :n] = 1.0
    return out, mask
