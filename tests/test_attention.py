"""The chunked causal attention against a naive float64 loop, and inside the shrunken Qwen3 model."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_params
from rlhf.models.attention import chunked_causal_attention, decode_attention, left_padding_starts
from rlhf.models.checkpoint import init_state, load_actors
from rlhf.models.passes import pack, policy_logprobs
from rlhf.models.sampling import generate
from rlhf.models.sources import make_model_available
from rlhf.config.params import parse_params
from test_models import perturb_adapter, prompts_and_responses


def naive_causal_attention(q, k, v, scaling):
    """One query at a time, one head at a time: softmax over keys 0..t of (q_t · k_j)·scaling, then Σ p_j v_j."""
    b, h, T, d = q.shape
    g = h // k.shape[1]
    rows = []
    for i in range(b):
        for head in range(h):
            kv = head // g  # query heads [kv·g, (kv+1)·g) share key/value head kv
            for t in range(T):
                logits = torch.stack([(q[i, head, t] * k[i, kv, j]).sum() * scaling for j in range(t + 1)])
                weights = torch.exp(logits - logits.max())
                p = weights / weights.sum()
                rows.append(sum(p[j] * v[i, kv, j] for j in range(t + 1)))
    return torch.stack(rows).view(b, h, T, d)

@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_chunked_attention_matches_a_naive_loop_and_its_gradients(chunk):
    gen = torch.Generator().manual_seed(chunk)
    b, h, hk, T, d = 2, 4, 2, 11, 8  # T not a multiple of the chunk; two query heads per K/V head
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
               for shape in ((b, h, T, d), (b, hk, T, d), (b, hk, T, d)))
    scaling = d ** -0.5
    got = chunked_causal_attention(q, k, v, scaling, chunk=chunk)
    want = naive_causal_attention(q, k, v, scaling)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    grad = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for name, g_got, g_want in zip("qkv", got_grads, want_grads):
        # dk and dv are summed over chunks in fp32 (as they are for bf16 inputs)
        torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-5, msg=f"d{name}")


def test_left_padded_rows_match_the_unpadded_rows_and_stay_finite():
    """Prefill of left-padded prompts: each real row equals its own unpadded attention; pad rows are finite."""
    gen = torch.Generator().manual_seed(0)
    b, h, hk, T, d = 3, 4, 2, 9, 8
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((b, h, T, d), (b, hk, T, d),
                                                                                    (b, hk, T, d)))
    starts = torch.tensor([0, 3, 8])
    got = chunked_causal_attention(q, k, v, 0.3, chunk=4, key_start=starts)
    assert torch.isfinite(got).all()
    for i, s in enumerate(starts.tolist()):
        want = naive_causal_attention(q[i:i + 1, :, s:], k[i:i + 1, :, s:], v[i:i + 1, :, s:], 0.3)
        torch.testing.assert_close(got[i:i + 1, :, s:], want, rtol=0, atol=1e-10)


def test_left_padding_is_recognised_only_in_the_exact_mask():
    from transformers.masking_utils import sdpa_mask

    T = 6
    padding = torch.tensor([[1] * T, [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    mask = sdpa_mask(batch_size=2, q_length=T, kv_length=T, attention_mask=padding,
                     allow_is_causal_skip=False)
    assert left_padding_starts(mask).tolist() == [0, 2]
    right = torch.tensor([[1] * T, [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    mask_right = sdpa_mask(batch_size=2, q_length=T, kv_length=T, attention_mask=right,
                           allow_is_causal_skip=False)
    assert left_padding_starts(mask_right) is None  # not left padding: fall back to SDPA
    assert left_padding_starts(torch.ones(2, 1, T, T, dtype=torch.bool)) is None  # not causal


def test_decode_step_matches_the_last_row_of_full_attention():
    """One new query against the cache = the last row of causal attention over the row's real tokens."""
    gen = torch.Generator().manual_seed(2)
    b, h, hk, S, d = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((b, h, 1, d), (b, hk, S, d),
                                                                                    (b, hk, S, d)))
    mask = torch.ones(b, 1, 1, S, dtype=torch.bool)
    mask[1, ..., :3] = False  # row 1 is left-padded by 3
    got = decode_attention(q, k, v, 0.3, mask)
    for i, s in enumerate((0, 3)):
        full_q = torch.cat([torch.zeros(1, h, S - s - 1, d, dtype=q.dtype), q[i:i + 1]], dim=2)
        want = naive_causal_attention(full_q, k[i:i + 1, :, s:], v[i:i + 1, :, s:], 0.3)[:, :, -1:]
        torch.testing.assert_close(got[i:i + 1], want, rtol=0, atol=1e-10)


def test_chunked_attention_rejects_uneven_head_groups():
    q, kv = torch.zeros(1, 3, 4, 8), torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="evenly"):
        chunked_causal_attention(q, kv, kv, 1.0)


@pytest.fixture
def two_projects(tmp_path, monkeypatch, tiny_policy, tiny_reward):
    monkeypatch.chdir(tmp_path)
    made = {}
    for attention in ("chunked", "eager"):
        params = parse_params(tiny_params(tiny_policy, tiny_reward, policy_model={"attention": attention}))
        if not made:
            make_model_available(params.policy_model.id, None, Path(params.paths.policy_model), "policy")
            init_state(params, Path("state"))
        made[attention] = params
    return made


def test_model_with_chunked_attention_equals_eager_in_fp32(two_projects):
    """Right-padded micro-batches through the whole model: log-probs and LoRA gradients as with eager attention."""
    results = {}
    for attention, params in two_projects.items():
        actors = load_actors(params, Path("state"), trainable=True)
        assert actors.model.get_base_model().config._attn_implementation == attention
        perturb_adapter(actors)
        prompts, responses = prompts_and_responses(actors.tokenizer)
        packed = pack(prompts, responses)
        logprobs, _ = policy_logprobs(actors, packed, 0.7)
        (logprobs.sum()).backward()
        grads = {n: p.grad.clone() for n, p in actors.model.named_parameters() if p.grad is not None}
        results[attention] = (logprobs.detach(), grads)
    (lp_c, g_c), (lp_e, g_e) = results["chunked"], results["eager"]
    torch.testing.assert_close(lp_c, lp_e, rtol=0, atol=1e-5)
    assert g_c.keys() == g_e.keys() and g_c
    for name in g_c:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_generation_with_padding_and_cache_falls_back_to_sdpa(two_projects):
    """Left-padded prompts and a KV cache are not the chunked case: generation must give the same tokens."""
    out = {}
    for attention, params in two_projects.items():
        actors = load_actors(params, Path("state"), trainable=False, with_critic=False)
        perturb_adapter(actors)
        prompts, _ = prompts_and_responses(actors.tokenizer)
        prompts = [p[: 20 + 9 * i] for i, p in enumerate(prompts)]  # different lengths: padding in the chunk
        out[attention] = generate(actors, prompts, 6, 1.0, 1.0, seed=0, chunk_size=3, greedy=True)
    assert out["chunked"] == out["eager"]
