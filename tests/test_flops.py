"""The FLOP counts of rlhf/reports/flops.py against torch's own count of the matmuls a tiny model runs
(torch.utils.flop_counter), forward and backward, with and without LoRA; causal pairs against a naive loop."""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rlhf.reports.flops import Shape, attention_flops, forward_flops, lora_backward_flops, lora_flops_per_token

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    cfg._attn_implementation = "eager"  # plain matmuls the counter sees (over the full L × L square)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def counted(fn, layers_and_head: bool = True) -> int:
    """The matmul FLOPs torch counts, by default only inside the decoder layers and the LM head: what the formulas
    cover (outside them transformers 5.17 computes the rotary angles as a small matmul, 5.24 does not). A backward
    pass is not attributed to modules: its total (the rotary angles need no gradient)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    if not layers_and_head:
        return counter.get_total_flops()
    counted_in = re.compile(r"(\.layers\.\d+|\.lm_head)$")
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if counted_in.search(name))


def square_minus_causal(shape: Shape, lengths) -> int:
    """What an eager kernel multiplies beyond the causal pairs (the masked upper triangle)."""
    return sum(attention_flops(shape, n, causal=False) - attention_flops(shape, n) for n in lengths)


def test_causal_pairs_against_a_naive_loop():
    shape = Shape(hidden=8, intermediate=16, layers=3, heads=2, kv_heads=1, head_dim=4, vocab=10)
    for n in (1, 2, 7):
        pairs = sum(1 for i in range(n) for j in range(n) if j <= i)
        assert attention_flops(shape, n) == 3 * 2 * (2 * 2 * 4 * pairs)
        assert attention_flops(shape, n, causal=False) == 3 * 2 * (2 * 2 * 4 * n * n)


@pytest.mark.parametrize("logits_everywhere", [True, False])
def test_forward_matches_torch_counter(logits_everywhere):
    model = tiny_lm()
    shape = Shape.of(model.config)
    ids = torch.randint(0, shape.vocab, (1, 11))
    if logits_everywhere:
        got = counted(lambda: model(ids))
        positions = 11
    else:  # a backbone pass (the critic's or reward model's), no LM head
        got = counted(lambda: model.model(ids))
        positions = 0
    assert got == forward_flops(shape, [11], positions) + square_minus_causal(shape, [11])


def lora_model(r: int):
    from peft import LoraConfig, get_peft_model

    from rlhf.models.actors import quiet_peft_wrap

    with quiet_peft_wrap():
        return get_peft_model(tiny_lm(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS)))


def test_lora_forward_and_backward_match_torch_counter():
    r, n = 4, 9
    model = lora_model(r)
    shape = Shape.of(model.config)
    ids = torch.randint(0, shape.vocab, (1, n))
    assert counted(lambda: model(ids)) == forward_flops(shape, [n], n, r, TARGETS) + square_minus_causal(shape, [n])
    # The frozen embedding's output needs no gradient, so the first layer's q/k/v inputs would get none; an
    # embedding input that requires grad makes every projection's input gradient count, as the formula does.
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds).logits.sum()
    backward = counted(loss.backward, layers_and_head=False)
    assert backward == lora_backward_flops(shape, [n], n, r, TARGETS) + 2 * square_minus_causal(shape, [n])
    assert all(p.grad is None for name, p in model.named_parameters() if "lora_" not in name)  # base frozen


def test_lora_flops_only_count_the_adapted_projections():
    shape = Shape(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)
    assert lora_flops_per_token(shape, 4, ("q_proj",)) == 2 * 2 * 4 * (64 + 64)
    assert lora_flops_per_token(shape, 4, ()) == 0
    assert shape.weight_bytes(4) == 4 * (shape.linear_params() + 128 * 64)
