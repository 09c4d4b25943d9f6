"""Our sampling loop: exact samples of softmax(logits/T), HF's nucleus, and the same tokens as generate() greedily."""

from pathlib import Path

import pytest
import torch

from rlhf.models.checkpoint import load_actors
from rlhf.models.passes import exact_kl, left_pad, pack
from rlhf.models.reference_cache import reference_kl, reference_prompt_kv
from rlhf.models.sampling import (
    CachedLM, KeptLogprobs, decode, generate, generate_with_reference_kl, merged_policy, nucleus_filter, pick_tokens,
)
from test_models import perturb_adapter, project, prompts_and_responses  # noqa: F401 (fixture)


def test_gumbel_max_draws_follow_the_tempered_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(40000, 1)  # (n, V): one draw per row
    gen = torch.Generator().manual_seed(0)
    draws = pick_tokens(logits, temperature=0.7, top_p=1.0, greedy=False, generator=gen)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    want = torch.softmax(logits[0].double() / 0.7, -1)
    assert (freq - want).abs().max() < 0.01, (freq, want)  # binomial sd ≤ 0.0025


def test_nucleus_keeps_what_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=gen) * 3
    for top_p in (0.1, 0.5, 0.9, 0.99):
        ours = torch.isfinite(nucleus_filter(logits, top_p))
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), top_p


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(5000, 1)
    draws = pick_tokens(logits, 1.0, 0.5, False, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}


@pytest.mark.parametrize("rows_per_pass", [None, 1, 2])
def test_greedy_generation_equals_transformers_generate(project, rows_per_pass):
    from transformers import GenerationConfig

    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer)
    prompts = [p[: 15 + 10 * i] for i, p in enumerate(prompts)]
    ours = generate(actors, prompts, 8, 1.0, 1.0, seed=0, chunk_size=3, greedy=True, rows_per_pass=rows_per_pass)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    ids, mask = left_pad([prompts[i] for i in order], 0)
    config = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=actors.stop_ids, pad_token_id=0)
    with torch.no_grad():
        out = actors.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    for i, row in zip(order, out[:, ids.shape[1]:].tolist()):
        cut = next((k + 1 for k, t in enumerate(row) if t in actors.stop_ids), len(row))
        assert ours[i] == row[:cut]


def test_prefill_in_passes_fills_the_cache_as_one_left_padded_pass(project):
    """Each pass drops the columns that are padding in all its rows; the chunk's cache must come out as the whole
    left-padded prefill writes it (real slots equal, pad slots finite), and so must the next step's logits."""
    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer, n=4)
    prompts = sorted((p[: 12 + 11 * i] for i, p in enumerate(prompts)), key=len)
    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model = actors.model.get_base_model()
    lms = {}
    with torch.no_grad(), merged_policy(actors):
        for rows in (4, 1, 3):
            lm = CachedLM(model, ids.shape[1] + 2)
            first = lm.prefill(ids, mask, positions, rows)
            token = first.argmax(-1)
            grown = torch.cat([mask, mask.new_ones((4, 1))], 1)
            lms[rows] = (lm, first, lm.step(token, grown, positions[:, -1:] + 1))
    whole, first, nxt = lms[4]
    real = mask.bool()  # (b, P)
    for rows in (1, 3):
        lm, f, n = lms[rows]
        torch.testing.assert_close(f, first, rtol=0, atol=1e-5)
        torch.testing.assert_close(n, nxt, rtol=0, atol=1e-5)
        for ours, theirs in zip(lm.cache.layers, whole.cache.layers):
            assert ours.keys.shape == theirs.keys.shape  # (b, hk, P + 1, d)
            P = ids.shape[1]
            for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
                torch.testing.assert_close(a[:, :, :P].transpose(1, 2)[real], b[:, :, :P].transpose(1, 2)[real],
                                           rtol=0, atol=1e-5)
            assert torch.isfinite(ours.keys).all() and torch.isfinite(ours.values).all()


def test_checking_for_the_end_every_k_steps_returns_the_same_tokens_and_kept_logits(project):
    """The host reads "every row stopped" once per k decode steps: the steps run past the end must leave no trace
    in the tokens or the kept log-probs, which equal those of a check after every step bit for bit."""
    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer, n=4)
    ids, mask = left_pad(sorted((p[: 12 + 9 * i] for i, p in enumerate(prompts)), key=len), 0)
    model = actors.model.get_base_model()

    def run(k, stops):
        kept, steps, gen = KeptLogprobs(12, 0.7), [], torch.Generator().manual_seed(5)
        with torch.no_grad(), merged_policy(actors):
            out = decode(CachedLM(model, ids.shape[1] + 12), ids, mask, 12, stops, 0,
                         lambda logits: pick_tokens(logits, 0.7, 1.0, False, gen), 2, steps.append, kept, k)
        assert kept.logprobs.shape[1] == out.shape[1]  # decode told its observer which steps were returned
        return out, kept.logprobs.clone(), len(steps)

    free = run(1, actors.stop_ids)[0]
    stops = [*actors.stop_ids, *(int(free[r, 1 + r]) for r in range(4))]  # row r stops by its token 2 + r
    want, kept, ran = run(1, stops)
    assert want.shape[1] <= 5 < 12 and ran == want.shape[1]
    for k in (2, 3, 5, 8, 64):
        out, logprobs, steps = run(k, stops)
        assert torch.equal(out, want) and torch.equal(logprobs, kept), k
        assert steps == min(12, -(-ran // k) * k)  # the steps up to the check that saw the end
    assert torch.equal(run(5, actors.stop_ids)[0], free)  # no early end: all 12 steps either way


def reference_kl_over_cached_prompts(actors, prompts, rows_per_pass: int, folder=None):
    """The evaluation's KL callback: the reference over the responses on top of its cached prompt keys/values."""
    kv = reference_prompt_kv(actors, prompts, rows_per_pass, folder)
    return lambda rows, responses, kept: reference_kl(kv, rows, [prompts[i] for i in rows], responses, kept, actors,
                                                      0.7, rows_per_pass)


@pytest.mark.parametrize("greedy", [True, False])
def test_eval_kl_from_the_samplers_logits_equals_the_exact_kl_pass(project, greedy):
    """The evaluation's KL comes from the sampler's (merged) logits, kept while decoding, and the reference over
    each response on top of the prompts' cached keys/values: it must equal Σ_t KL(π ‖ π_ref) from the packed
    passes over prompt + response, and the responses must be generate()'s."""
    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer, n=5)
    prompts = [p[: 15 + 7 * i] for i, p in enumerate(prompts)]
    kw = dict(seed=3, chunk_size=3, greedy=greedy, rows_per_pass=2)
    first = generate(actors, prompts, 6, 0.7, 1.0, **kw)
    actors.stop_ids = [*actors.stop_ids, first[0][1]]  # row 0 now stops at its 2nd token: pads follow in its row
    plain = generate(actors, prompts, 6, 0.7, 1.0, **kw)
    assert len(plain[0]) == 2 and max(map(len, plain)) == 6
    responses, kls = generate_with_reference_kl(actors, prompts, 6, 0.7, 1.0, kl_temperature=0.7,
                                                reference_kl=reference_kl_over_cached_prompts(actors, prompts, 2), **kw)
    assert responses == plain
    with torch.no_grad():
        want = exact_kl(actors, pack(prompts, responses), 0.7).sum(-1)  # (b,)
    assert float(want.min()) > 0  # the adapter moved the policy: a wrong pairing of positions would show
    torch.testing.assert_close(torch.tensor(kls, dtype=torch.float32), want, rtol=1e-4, atol=1e-5)


def test_with_a_bf16_base_the_kl_decodes_through_the_unmerged_adapter(project, tiny_policy, tiny_reward, monkeypatch):
    """A bf16 merge W + (α/r)·BA rounds small adapter elements away: the KL must measure the adapter itself."""
    import rlhf.models.sampling as sampling
    from conftest import tiny_params
    from rlhf.config.params import parse_params

    params = parse_params(tiny_params(tiny_policy, tiny_reward, policy_model={"dtype": "bfloat16"}))
    actors = load_actors(params, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer)
    merges = []
    real_merge = sampling.merged_policy
    monkeypatch.setattr(sampling, "merged_policy", lambda a: merges.append(1) or real_merge(a))
    generate(actors, prompts, 4, 0.7, 1.0, seed=0, chunk_size=3, greedy=True)
    assert merges == [1]  # plain sampling still merges
    responses, kls = generate_with_reference_kl(actors, prompts, 4, 0.7, 1.0, seed=0, chunk_size=3, greedy=True,
                                                kl_temperature=0.7, rows_per_pass=2,
                                                reference_kl=reference_kl_over_cached_prompts(actors, prompts, 2))
    assert merges == [1]
    with torch.no_grad():
        want = exact_kl(actors, pack(prompts, responses), 0.7).sum(-1)  # (b,)
    torch.testing.assert_close(torch.tensor(kls, dtype=torch.float32), want.float(), rtol=0.1, atol=1e-3)


@pytest.mark.parametrize("rows,out_f,in_f,bias", [(32, 48, 40, False), (8, 400, 40, True), (3, 48, 40, True),
                                                   (200, 48, 40, False)])
def test_weight_major_linear_equals_linear_and_is_undone(rows, out_f, in_f, bias):
    from rlhf.models.sampling import weight_major_linears

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=bias), torch.nn.Linear(out_f, in_f))
    x = torch.randn(rows, 1, in_f)  # (b, 1, in): one decode step's shape
    want = model(x)
    with weight_major_linears(model, enabled=True):
        assert all("forward" in vars(m) for m in model)
        got = model(x)
    assert all("forward" not in vars(m) for m in model)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with weight_major_linears(model, enabled=False):
        assert all("forward" not in vars(m) for m in model)
