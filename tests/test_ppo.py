"""The PPO math against naive float64 loops written straight from the formulas."""

import math

import numpy as np
import pytest
import torch

from rlhf import ppo

rng = np.random.default_rng(0)


def ragged_batch(B=5, T=7):
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    mask = np.zeros((B, T))
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return lengths, mask


def test_gae_matches_naive_loop():
    lengths, mask = ragged_batch()
    B, T = mask.shape
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)]:
        adv, ret = ppo.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)
        for i, n in enumerate(lengths):
            for t in range(n):
                expected = 0.0
                for k in range(t, n):  # A_t = Σ_k (γλ)^{k-t} δ_k, with V after the last token = 0
                    v_next = values[i, k + 1] if k + 1 < n else 0.0
                    delta = rewards[i, k] + gamma * v_next - values[i, k]
                    expected += (gamma * lam) ** (k - t) * delta
                assert adv[i, t].item() == pytest.approx(expected, abs=1e-10)
                assert ret[i, t].item() == pytest.approx(expected + values[i, t], abs=1e-10)
            assert (adv[i, n:] == 0).all() and (ret[i, n:] == 0).all()


def test_gae_lambda_one_gamma_one_is_monte_carlo_return():
    lengths, mask = ragged_batch()
    rewards = rng.normal(size=mask.shape) * mask
    values = rng.normal(size=mask.shape)
    _, ret = ppo.gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), 1.0, 1.0)
    for i, n in enumerate(lengths):
        for t in range(n):
            assert ret[i, t].item() == pytest.approx(rewards[i, t:n].sum(), abs=1e-10)


def test_masked_mean_var_whiten_match_numpy():
    lengths, mask = ragged_batch(6, 9)
    x = rng.normal(3.0, 2.0, size=mask.shape)
    valid = x[mask == 1]
    assert ppo.masked_mean(torch.tensor(x), torch.tensor(mask)).item() == pytest.approx(valid.mean())
    assert ppo.masked_var(torch.tensor(x), torch.tensor(mask)).item() == pytest.approx(valid.var(ddof=1))
    w = ppo.masked_whiten(torch.tensor(x), torch.tensor(mask)).numpy()
    expected = (valid - valid.mean()) / math.sqrt(valid.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask == 1], expected, rtol=1e-9)
    assert (w[mask == 0] == 0).all()
    keep = ppo.masked_whiten(torch.tensor(x), torch.tensor(mask), shift_mean=False).numpy()
    np.testing.assert_allclose(keep[mask == 1], expected + valid.mean(), rtol=1e-9)


def test_kl_estimators_match_formulas():
    lp, ref = rng.normal(-2, 1, size=20), rng.normal(-2, 1, size=20)
    for name, f in {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: (math.exp(b - a) - 1) - (b - a),
    }.items():
        got = ppo.kl_per_token(torch.tensor(lp), torch.tensor(ref), name).numpy()
        np.testing.assert_allclose(got, [f(a, b) for a, b in zip(lp, ref)], rtol=1e-10, atol=1e-12)
    assert (ppo.kl_per_token(torch.tensor(lp), torch.tensor(ref), "k3") >= 0).all()


def test_kl_estimators_are_unbiased_or_consistent_on_samples():
    # Two categorical distributions; sample from p and compare the estimators' means with the true KL(p||q).
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    gen = torch.Generator().manual_seed(0)
    a = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    k1 = ppo.kl_per_token(p.log()[a], q.log()[a], "k1").mean().item()
    k3 = ppo.kl_per_token(p.log()[a], q.log()[a], "k3").mean().item()
    assert k1 == pytest.approx(true_kl, abs=2e-3)
    assert k3 == pytest.approx(true_kl, abs=2e-3)


def test_per_token_rewards_put_score_on_last_real_token():
    lengths, mask = ragged_batch()
    kl = rng.normal(size=mask.shape)
    scores = rng.normal(size=len(lengths))
    rewards, non_score = ppo.per_token_rewards(torch.tensor(scores), torch.tensor(kl), torch.tensor(mask), 0.1)
    for i, n in enumerate(lengths):
        for t in range(mask.shape[1]):
            expected = -0.1 * kl[i, t] if t < n else 0.0
            assert non_score[i, t].item() == pytest.approx(expected)
            if t == n - 1:
                expected += scores[i]
            assert rewards[i, t].item() == pytest.approx(expected)


def test_missing_eos_penalty():
    s = torch.tensor([1.0, 2.0, 3.0])
    eos = torch.tensor([True, False, True])
    assert ppo.penalise_missing_eos(s, eos, 1.5).tolist() == [1.0, 0.5, 3.0]
    assert ppo.penalise_missing_eos(s, eos, None).tolist() == [1.0, 2.0, 3.0]


def test_clipped_policy_loss_matches_naive():
    new, old, adv = rng.normal(-1, 0.3, 50), rng.normal(-1, 0.3, 50), rng.normal(size=50)
    out = ppo.clipped_policy_loss(torch.tensor(new), torch.tensor(old), torch.tensor(adv), 0.2)
    for i in range(50):
        r = math.exp(new[i] - old[i])
        a = -adv[i] * r
        b = -adv[i] * min(max(r, 0.8), 1.2)
        assert out.loss[i].item() == pytest.approx(max(a, b))
        assert out.ratio[i].item() == pytest.approx(r)
        assert bool(out.clipped[i]) == (b > a)
        assert out.approxkl[i].item() == pytest.approx(0.5 * (new[i] - old[i]) ** 2)


def test_clipped_value_loss_matches_naive():
    v, v_old, ret = rng.normal(size=50), rng.normal(size=50), rng.normal(size=50)
    out = ppo.clipped_value_loss(torch.tensor(v), torch.tensor(v_old), torch.tensor(ret), 0.2)
    for i in range(50):
        vc = v_old[i] + min(max(v[i] - v_old[i], -0.2), 0.2)
        assert out.loss[i].item() == pytest.approx(0.5 * max((v[i] - ret[i]) ** 2, (vc - ret[i]) ** 2))
        assert bool(out.clipped[i]) == ((vc - ret[i]) ** 2 > (v[i] - ret[i]) ** 2)


def test_policy_loss_gradient_is_zero_outside_trust_region():
    new = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)  # ratio e^0.5 > 1.2
    ppo.clipped_policy_loss(new, torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64),
                            0.2).loss.sum().backward()
    assert new.grad.item() == 0.0


def test_lr_schedule():
    assert ppo.lr_multiplier(0, 0, 10, "constant") == 1.0
    assert ppo.lr_multiplier(5, 0, 10, "linear") == pytest.approx(0.5)
    assert ppo.lr_multiplier(0, 0, 10, "cosine") == pytest.approx(1.0)
    assert ppo.lr_multiplier(10, 0, 10, "cosine") == pytest.approx(0.0)
    assert ppo.lr_multiplier(0, 2, 10, "constant") == pytest.approx(1 / 3)


def test_pad_ragged():
    x, m = ppo.pad_ragged([[1.0, 2.0], [3.0], []])
    assert x.tolist() == [[1.0, 2.0], [3.0, 0.0], [0.0, 0.0]]
    assert m.tolist() == [[1, 1], [1, 0], [0, 0]]


def test_exact_kl_matches_naive_sum():
    logits, ref = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    got = ppo.kl_full(torch.tensor(logits), torch.tensor(ref)).numpy()
    for b in range(2):
        for t in range(3):
            p = np.exp(logits[b, t]) / np.exp(logits[b, t]).sum()
            q = np.exp(ref[b, t]) / np.exp(ref[b, t]).sum()
            assert got[b, t] == pytest.approx(float((p * np.log(p / q)).sum()), abs=1e-10)


def test_dual_clip_policy_loss_matches_naive():
    # Ratios spread far beyond 1 ± ε so that every branch (clip, dual clip, neither) occurs.
    new, old, adv = rng.normal(-1, 1.0, 200), rng.normal(-1, 0.3, 200), rng.normal(size=200)
    eps, c = 0.2, 3.0
    out = ppo.clipped_policy_loss(torch.tensor(new), torch.tensor(old), torch.tensor(adv), eps, dual_clip=c)
    n_dual = 0
    for i in range(200):
        r = math.exp(new[i] - old[i])
        standard = max(-adv[i] * r, -adv[i] * min(max(r, 1 - eps), 1 + eps))
        # Ye et al. (2020): for Â < 0 the objective is max(min(ρÂ, clip(ρ)Â), cÂ); the loss is its negative
        expected = min(standard, -c * adv[i]) if adv[i] < 0 else standard
        assert out.loss[i].item() == pytest.approx(expected)
        assert bool(out.dual_clipped[i]) == (adv[i] < 0 and standard > -c * adv[i])
        n_dual += bool(out.dual_clipped[i])
    assert 0 < n_dual < 200
    off = ppo.clipped_policy_loss(torch.tensor(new), torch.tensor(old), torch.tensor(adv), eps)
    assert not off.dual_clipped.any()
    assert (off.loss >= out.loss).all() and (off.loss > out.loss).any()


def test_dual_clip_stops_the_gradient_of_a_negative_advantage_beyond_c():
    new = torch.tensor([math.log(5.0)], dtype=torch.float64, requires_grad=True)  # ratio 5 > c = 3
    old, adv = torch.tensor([0.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    ppo.clipped_policy_loss(new, old, adv, 0.2, dual_clip=3.0).loss.sum().backward()
    assert new.grad.item() == 0.0
    new.grad = None
    ppo.clipped_policy_loss(new, old, adv, 0.2).loss.sum().backward()
    assert new.grad.item() == pytest.approx(5.0)  # d(−A·ρ)/d log π = ρ without the dual clip


def test_entropy_loss_matches_naive_and_its_gradient_raises_entropy():
    lengths, mask = ragged_batch()
    logits = torch.tensor(rng.normal(size=(*mask.shape, 6)), requires_grad=True)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T)
    loss = ppo.entropy_loss(entropy, torch.tensor(mask), 0.05, 11.0)
    expected = -0.05 * sum(entropy[i, t].item() for i, n in enumerate(lengths) for t in range(n)) / 11.0
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad  # gradient descent on the loss
        lq = torch.log_softmax(stepped, -1)
        after = -(lq.exp() * lq).sum(-1)
    assert float((after * torch.tensor(mask)).sum()) > float((entropy.detach() * torch.tensor(mask)).sum())
    assert (logits.grad[torch.tensor(mask) == 0] == 0).all()  # padding gets no gradient


def test_explained_variance_matches_naive():
    lengths, mask = ragged_batch(6, 9)
    returns = rng.normal(1.0, 2.0, size=mask.shape)
    values = returns + rng.normal(0.0, 1.0, size=mask.shape)
    valid = mask == 1
    r, v = returns[valid], values[valid]
    expected = 1 - np.var(r - v) / np.var(r)
    got = ppo.explained_variance(torch.tensor(values), torch.tensor(returns), torch.tensor(mask))
    assert got == pytest.approx(expected, rel=1e-10)
    assert ppo.explained_variance(torch.tensor(returns), torch.tensor(returns), torch.tensor(mask)) == 1.0
    padding_noise = values + (1 - mask) * 100.0  # padding must not count
    assert ppo.explained_variance(torch.tensor(padding_noise), torch.tensor(returns), torch.tensor(mask)) == \
        pytest.approx(expected, rel=1e-10)
    assert math.isnan(ppo.explained_variance(torch.tensor(values), torch.ones(mask.shape, dtype=torch.float64),
                                             torch.tensor(mask)))


def test_adaptive_kl_coef_matches_ziegler_rule():
    coef, target, horizon, n = 0.05, 6.0, 10000, 64
    for kl in (0.0, 3.0, 5.5, 6.0, 6.6, 7.5, 100.0):
        error = kl / target - 1
        clipped = -0.2 if error < -0.2 else 0.2 if error > 0.2 else error
        expected = coef * (1 + clipped * n / horizon)
        assert ppo.adaptive_kl_coef(coef, kl, target, horizon, n) == pytest.approx(expected, rel=1e-12)
    assert ppo.adaptive_kl_coef(coef, 12.0, target, horizon, n) > coef > ppo.adaptive_kl_coef(coef, 1.0, target,
                                                                                           horizon, n)
    assert ppo.adaptive_kl_coef(coef, 6.0, target, horizon, n) == coef


def test_lr_schedule_matches_naive_formulas():
    total, warmup = 7, 2
    for it in range(total):
        if it < warmup:
            lin = cos = (it + 1) / (warmup + 1)
        else:
            progress = (it - warmup) / (total - warmup)
            lin, cos = 1 - progress, 0.5 * (1 + math.cos(math.pi * progress))
        assert ppo.lr_multiplier(it, warmup, total, "linear") == pytest.approx(lin)
        assert ppo.lr_multiplier(it, warmup, total, "cosine") == pytest.approx(cos)
        assert ppo.lr_multiplier(it, warmup, total, "constant") == pytest.approx(1.0 if it >= warmup else lin)
