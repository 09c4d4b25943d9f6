"""Our sampling loop: exact samples of softmax(logits/T), HF's nucleus, and the same tokens as generate() greedily."""

from pathlib import Path

import torch

from rlhf.models.checkpoint import load_actors
from rlhf.models.passes import left_pad
from rlhf.models.sampling import generate
from rlhf.models.sampling import nucleus_filter, pick_tokens
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


def test_greedy_generation_equals_transformers_generate(project):
    from transformers import GenerationConfig

    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer)
    prompts = [p[: 15 + 10 * i] for i, p in enumerate(prompts)]
    ours = generate(actors, prompts, 8, 1.0, 1.0, seed=0, chunk_size=3, greedy=True)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    ids, mask = left_pad([prompts[i] for i in order], 0)
    config = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=actors.stop_ids, pad_token_id=0)
    with torch.no_grad():
        out = actors.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    for i, row in zip(order, out[:, ids.shape[1]:].tolist()):
        cut = next((k + 1 for k, t in enumerate(row) if t in actors.stop_ids), len(row))
        assert ours[i] == row[:cut]
