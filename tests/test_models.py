"""The model code path on shrunken Qwen3 copies with the real Qwen3 tokenizer."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, tiny_params
from rlhf.models.checkpoint import init_state, load_actors
from rlhf.models.passes import (
    left_pad, pack, policy_logprobs, reference_logprobs, token_logprobs, length_sorted_groups,
)
from rlhf.models.sampling import merged_policy, preallocated_cache
from rlhf.models.sources import load_causal_lm, make_model_available
from rlhf.config.params import parse_params
from rlhf.models.sampling import cache_kwarg
from rlhf.models.scorers import ClassifierScorer, budget_batches, render_for_reward_model
from rlhf.runtime.device import resolve_device


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_policy, tiny_reward):
    monkeypatch.chdir(tmp_path)
    params = parse_params(tiny_params(tiny_policy, tiny_reward))
    make_model_available(params.policy_model.id, None, Path(params.paths.policy_model), "policy")
    make_model_available(params.reward_model.id, None, Path(params.paths.reward_model), "reward")
    init_state(params, Path("state"))
    return params


def perturb_adapter(actors, seed=0):
    """A trained-looking policy: LoRA B ≠ 0, so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in actors.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def prompts_and_responses(tokenizer, n=3):
    df = pd.read_parquet(ROOT / "data/tldr/validation-1945.parquet").head(n)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"][-60:] for p in df.prompt]
    responses = [tokenizer(c, add_special_tokens=False)["input_ids"][: 4 + 3 * i] for i, c in enumerate(df.completion)]
    return prompts, responses


def test_qwen3_tokenizer_and_stop_tokens(project):
    actors = load_actors(project, Path("state"), trainable=False)
    tok = actors.tokenizer
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert actors.stop_ids == [151643, 151645]  # <|endoftext|>, <|im_end|>
    assert tok.pad_token_id == 151643 and tok.bos_token is None


def test_pack_right_pads_and_indexes_the_predicting_positions():
    p = pack([[5, 6, 7], [8]], [[1, 2], [3]])
    assert p.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 3, 0, 0, 0]]
    assert p.response_ids.tolist() == [[1, 2], [3, 0]]
    assert p.response_mask.tolist() == [[1, 1], [1, 0]]
    assert p.response_index.tolist() == [[2, 3], [0, 1]]  # hidden state at t-1 predicts token t


def test_reference_is_adapter_disabled_policy_equal_to_separate_base(project):
    actors = load_actors(project, Path("state"), trainable=False)
    perturb_adapter(actors)
    prompts, responses = prompts_and_responses(actors.tokenizer)
    packed = pack(prompts, responses)
    with torch.no_grad():
        ref = reference_logprobs(actors, packed, 0.7)
        pol, _ = policy_logprobs(actors, packed, 0.7)
        base = load_causal_lm(Path(project.paths.policy_model), "float32")
        separate, _ = token_logprobs(base, packed, 0.7)
    torch.testing.assert_close(ref, separate, rtol=0, atol=1e-5)
    assert (pol - ref).abs().max() > 1e-2  # the adapter really changes the policy


def test_stages_that_never_run_the_reference_do_not_load_it_and_a_reference_pass_then_refuses(project):
    """Rollout and update load without the reference: a separate policy_model.reference costs them no memory, and
    a reference pass on such actors stops instead of quietly using the adapter-disabled base in its place."""
    separate = project.model_copy(update={"policy_model": project.policy_model.model_copy(
        update={"reference": project.paths.policy_model})})
    assert load_actors(separate, Path("state"), trainable=False, with_critic=False).reference is not None
    actors = load_actors(separate, Path("state"), trainable=False, with_critic=False, with_reference=False)
    assert actors.reference is None
    prompts, responses = prompts_and_responses(actors.tokenizer)
    with pytest.raises(RuntimeError, match="without the reference"):
        reference_logprobs(actors, pack(prompts, responses), 0.7)


def test_logprobs_do_not_depend_on_micro_batch_padding(project):
    actors = load_actors(project, Path("state"), trainable=False)
    perturb_adapter(actors)
    prompts, responses = prompts_and_responses(actors.tokenizer)
    with torch.no_grad():
        together, _ = policy_logprobs(actors, pack(prompts, responses), 0.7)
        for i in range(len(prompts)):
            alone, _ = policy_logprobs(actors, pack([prompts[i]], [responses[i]]), 0.7)
            n = len(responses[i])
            torch.testing.assert_close(together[i, :n], alone[0, :n], rtol=0, atol=1e-4)


def test_groups_are_length_sorted():
    assert length_sorted_groups([5, 1, 4, 2], 2) == [1, 0, 1, 0]


# --------------------------------------------------------------------------------------------- reward model

POST_ROW = 1  # the "Gangnam Style" post


def test_reward_model_sees_its_own_chat_template(project):
    scorer = ClassifierScorer(Path(project.paths.reward_model), project.reward_model,
                              resolve_device(project.runtime.device, project.reward_model.dtype))
    df = pd.read_parquet(ROOT / "data/tldr/validation-1945.parquet")
    query, response = df.prompt[POST_ROW], " Mom woke me up with loud TV; I retaliated with Gangnam Style."
    text = render_for_reward_model(scorer.tokenizer, query, response)
    expected = (
        "<|im_start|>user\n" + query + "<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n" + response.strip() + "<|im_end|>\n"
    )
    assert text == expected
    assert text.startswith("<|im_start|>user\nSUBREDDIT: r/")
    ids = scorer.encode(query, response)
    assert ids[0] == 151644 and ids[-2:] == [151645, 198]  # <|im_start|> ... <|im_end|>\n, no BOS added


def test_batch_scores_equal_one_by_one_any_padding_side_and_order(project):
    scorer = ClassifierScorer(Path(project.paths.reward_model), project.reward_model,
                              resolve_device(project.runtime.device, project.reward_model.dtype))
    df = pd.read_parquet(ROOT / "data/tldr/validation-1945.parquet").head(6)
    queries, responses = list(df.prompt), [c[: 20 + 15 * i] for i, c in enumerate(df.completion)]
    single = [scorer.score([q], [r], [None])[0] for q, r in zip(queries, responses)]
    # HF's own forward on one unpadded sequence: logits[0][0].
    ids = torch.tensor([scorer.encode(queries[0], responses[0])])
    with torch.no_grad():
        hf = scorer.model(input_ids=ids).logits[0][0].item()
    assert single[0] == pytest.approx(hf, abs=1e-5)
    for side in ("left", "right"):
        scorer.tokenizer.padding_side = side
        batched = scorer.score(queries, responses, [None] * 6)
        assert batched == pytest.approx(single, abs=1e-4)
    order = [3, 0, 5, 1, 4, 2]
    shuffled = scorer.score([queries[i] for i in order], [responses[i] for i in order], [None] * 6)
    assert shuffled == pytest.approx([single[i] for i in order], abs=1e-4)


def test_budget_batches_respect_the_token_budget():
    lengths = [10, 300, 20, 290, 15, 5]
    batches = budget_batches(lengths, 600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 600 or len(b) == 1


def test_rm_accuracy_on_real_comparisons_with_the_shrunken_classifier(project, capsys):
    from rlhf.reports.rm_accuracy import run as rm_accuracy, wilson_interval

    report = rm_accuracy(project, ROOT / "data/tldr/comparisons-batch13-18.parquet", Path("rm.json"), limit=40)
    assert report["pairs"] == 40 and report["comparisons"] == 1771 and report["majority_ties_dropped"] > 0
    k = round(report["accuracy"] * report["pairs"])  # the interval belongs to this accuracy, not just any
    assert report["accuracy"] == k / report["pairs"]
    assert (report["ci95_low"], report["ci95_high"]) == pytest.approx(wilson_interval(k, report["pairs"]))
    assert any(k.startswith("confidence_") for k in report)


def test_accuracy_report_counts_wins_by_confidence():
    from rlhf.reports.rm_accuracy import accuracy_report, wilson_interval

    pairs = pd.DataFrame({"strength": [1, 1, 1, 4, 4, 4, 4]})
    chosen = np.array([0.9, 0.1, 0.5, 2.0, 2.0, 1.0, 3.0])
    rejected = np.array([0.2, 0.3, 0.5, 1.0, 1.5, 0.0, 4.0])  # wins: yes, no, tie (not a win), yes, yes, yes, no
    report = accuracy_report(pairs, chosen, rejected)
    assert report["accuracy"] == pytest.approx(4 / 7) and report["pairs"] == 7 and report["exact_ties"] == 1
    assert (report["ci95_low"], report["ci95_high"]) == pytest.approx(wilson_interval(4, 7))
    assert report["confidence_1"]["accuracy"] == pytest.approx(1 / 3) and report["confidence_1"]["pairs"] == 3
    assert report["confidence_4"]["accuracy"] == pytest.approx(3 / 4) and report["confidence_4"]["pairs"] == 4


def test_majority_vote_and_wilson_interval():
    from rlhf.reports.rm_accuracy import majority_pairs, wilson_interval

    df = pd.DataFrame({
        "post_id": ["p"] * 3, "prompt": ["q"] * 3, "summary_0": ["a", "b", "a"], "summary_1": ["b", "a", "b"],
        "chosen": ["a", "a", "b"], "confidence": [1, 7, 9], "policy_0": ["x"] * 3, "policy_1": ["y"] * 3,
    })
    pairs, ties = majority_pairs(df)
    assert ties == 0 and len(pairs) == 1 and pairs.at[0, "chosen"] == "a" and pairs.at[0, "votes"] == 3
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)


def test_bf16_base_trains_fp32_adapters_under_autocast(project, tiny_policy, tiny_reward):
    """bf16 base: adapters, value head and their gradients stay fp32, the adapter matmuls run in bf16, and the
    numbers agree with an all-fp32 model to bf16 accuracy. peft's input casting is off for good on a bf16 base (every
    pass runs under autocast), and on for an fp32 one."""
    bf16 = parse_params(tiny_params(tiny_policy, tiny_reward, policy_model={"dtype": "bfloat16"}))
    a16, a32 = (load_actors(p, Path("state"), trainable=True) for p in (bf16, project))
    for actors in (a16, a32):
        perturb_adapter(actors)
    prompts, responses = prompts_and_responses(a16.tokenizer)
    packed = pack(prompts, responses)
    seen = []
    q_proj = next(m for m in a16.tuner_layers if "lora_A" in dict(m.named_children()))  # a LoRA projection
    q_proj.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    lp16, _ = policy_logprobs(a16, packed, 0.7)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # no fp32 copy of the activations
    with torch.no_grad():
        lp32, _ = policy_logprobs(a32, packed, 0.7)
    m = packed.response_mask.bool()
    err = (lp16 - lp32).abs()[m]
    assert 0 < err.mean() < 0.05, err  # really bf16, and still the same model
    lp16.sum().backward()
    lora = {n: p for n, p in a16.model.named_parameters() if "lora_" in n and ".policy." in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    grads = [p.grad for n, p in lora.items() if "lora_B" in n]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert next(a16.model.get_base_model().parameters()).dtype == torch.bfloat16
    assert a16.tuner_layers and not any(layer.cast_input_dtype_enabled for layer in a16.tuner_layers)
    assert a32.tuner_layers and all(layer.cast_input_dtype_enabled for layer in a32.tuner_layers)


def test_sampling_with_the_merged_policy_equals_the_adapter_and_restores_the_base(project):
    """W' = W + (α/r)·BA during generation; afterwards the very same weight tensors are back (no rounding drift)."""
    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, responses = prompts_and_responses(actors.tokenizer)
    packed = pack(prompts, responses)
    bases = {n: m.weight.data_ptr() for n, m in actors.model.named_modules() if n.endswith("base_layer")}
    before = {n: m.weight.detach().clone() for n, m in actors.model.named_modules() if n.endswith("base_layer")}
    with torch.no_grad():
        unmerged, _ = policy_logprobs(actors, packed, 0.7)
        with merged_policy(actors):
            merged, _ = token_logprobs(actors.model.get_base_model(), packed, 0.7)  # adapters off: W' alone
            changed = [n for n, m in actors.model.named_modules() if n.endswith("base_layer")
                       and not torch.equal(m.weight, before[n])]
        after, _ = policy_logprobs(actors, packed, 0.7)
    assert len(changed) == len(bases) > 0  # every adapted projection was merged
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)
    assert torch.equal(after, unmerged)
    for n, m in actors.model.named_modules():
        if n.endswith("base_layer"):
            assert m.weight.data_ptr() == bases[n] and torch.equal(m.weight, before[n])


def test_preallocated_kv_cache_gives_the_same_generation_as_transformers_cache(project):
    from transformers import GenerationConfig

    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer)
    ids, mask = left_pad([p[: 15 + 10 * i] for i, p in enumerate(prompts)], 0)
    config = GenerationConfig(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    model = actors.model.get_base_model()
    with torch.no_grad():
        cache = preallocated_cache(model.config, ids.shape[1] + 8)
        ours = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                              **{cache_kwarg(model): cache})
        theirs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    assert torch.equal(ours, theirs)
    layer = cache.layers[0]
    assert layer.length == ids.shape[1] + 7 and layer.keys.data_ptr() == layer.buffers[0].data_ptr()  # no concat


def test_adapter_switch_equals_peft_set_adapter_and_keeps_both_trainable(project):
    """Actors.use() switches over the layers found at load; it must route exactly as peft's set_adapter does."""
    from rlhf.models.actors import CRITIC_ADAPTER, POLICY_ADAPTER

    actors = load_actors(project, Path("state"), trainable=True)
    perturb_adapter(actors)  # both adapters' B ≠ 0 and different, so a wrong route changes the output
    prompts, responses = prompts_and_responses(actors.tokenizer)
    ids = pack(prompts, responses).input_ids
    for adapter in (CRITIC_ADAPTER, POLICY_ADAPTER, CRITIC_ADAPTER):
        actors.use(adapter)
        assert all(layer.active_adapters == [adapter] for layer in actors.tuner_layers)
        assert all(p.requires_grad for p in actors.adapter_params)
        with torch.no_grad():
            ours = actors.model(input_ids=ids).logits
            actors.model.set_adapter(adapter)
            theirs = actors.model(input_ids=ids).logits
        assert torch.equal(ours, theirs), adapter
    actors.use(POLICY_ADAPTER)
    with torch.no_grad():
        policy = actors.model(input_ids=ids).logits
    assert not torch.equal(policy, ours)
    assert len(actors.adapter_params) == 2 * 2 * len(actors.tuner_layers)  # A and B of both adapters per layer


def test_fused_lora_forward_equals_peft_in_fp32(project):
    """Actors' LoRA layers add (α/r)·B·A·x inside the GEMM; in fp32 that equals peft's forward, values and grads."""
    from rlhf.models.actors import CRITIC_ADAPTER

    actors = load_actors(project, Path("state"), trainable=True)
    perturb_adapter(actors)
    prompts, responses = prompts_and_responses(actors.tokenizer)
    ids = pack(prompts, responses).input_ids
    lora = {n: p for n, p in actors.model.named_parameters() if "lora_" in n}
    results = {}
    for fused in (True, False):
        if not fused:
            for layer in actors.tuner_layers:
                del layer.forward  # back to peft's class forward
        for adapter in (CRITIC_ADAPTER, "policy"):
            actors.use(adapter)
            actors.model.zero_grad(set_to_none=True)
            logits = actors.model(input_ids=ids).logits
            logits.float().pow(2).mean().backward()
            grads = {n: p.grad.clone() for n, p in lora.items() if p.grad is not None}
            with torch.no_grad(), actors.model.disable_adapter():  # adapters off: the base alone either way
                base = actors.model(input_ids=ids).logits
            results[fused, adapter] = logits.detach(), grads, base
    for adapter in (CRITIC_ADAPTER, "policy"):
        (l1, g1, b1), (l0, g0, b0) = results[True, adapter], results[False, adapter]
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
        assert torch.equal(b1, b0) and not torch.allclose(b1, l1)
        assert g1.keys() == g0.keys() and any(f".{adapter}." in n for n in g1)
        for n in g1:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)
