"""The work of the pipeline's passes, counted from a decoder's shape: matmul FLOPs of forward and backward passes and
the weight bytes one decoding step reads. Benchmarks put each phase's time next to these limits.

A multiply-add is 2 FLOPs. Only useful work is counted: real tokens (no padding), causal attention (a token against
itself and the tokens before it), logits only where the pipeline computes them. Norms, activations, softmax and
rotary embeddings are left out (a few % of a pass at these sizes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Shape:
    """What the counts need of a decoder-only transformer config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)

    def projections(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear projection of one layer."""
        h, q, kv, ff = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}

    def linear_params(self) -> int:
        """Weights of every layer's projections (the embedding lookup is not a matmul; the LM head is counted apart)."""
        return self.layers * sum(i * o for i, o in self.projections().values())

    def weight_bytes(self, element_bytes: int) -> int:
        """Bytes one decoding step reads: every projection and the LM head (tied or not, it is read once a step)."""
        return (self.linear_params() + self.vocab * self.hidden) * element_bytes


def lora_flops_per_token(shape: Shape, r: int, targets: Sequence[str]) -> int:
    """x·Aᵀ then ·Bᵀ for each adapted projection of every layer (the α/r scale and the add are not matmuls)."""
    return shape.layers * sum(2 * r * (i + o) for name, (i, o) in shape.projections().items() if name in targets)


def attention_flops(shape: Shape, length: int, causal: bool = True) -> int:
    """Q·Kᵀ and P·V over one sequence, all layers. causal: the pairs (i, j ≤ i); otherwise the full square (what an
    eager kernel multiplies before masking)."""
    pairs = length * (length + 1) // 2 if causal else length * length
    return shape.layers * 2 * 2 * shape.heads * shape.head_dim * pairs


def forward_flops(shape: Shape, lengths: Sequence[int], logit_positions: int, lora_r: int = 0,
                  lora_targets: Sequence[str] = ()) -> int:
    """One forward over sequences of `lengths` tokens, the LM head at `logit_positions` of them (0 for a backbone
    pass: a value or reward head of one output is negligible)."""
    per_token = 2 * shape.linear_params() + lora_flops_per_token(shape, lora_r, lora_targets)
    return (sum(lengths) * per_token + sum(attention_flops(shape, n) for n in lengths)
            + 2 * shape.hidden * shape.vocab * logit_positions)


def lora_backward_flops(shape: Shape, lengths: Sequence[int], logit_positions: int, lora_r: int,
                        lora_targets: Sequence[str]) -> int:
    """The backward of forward_flops with a frozen base and trainable LoRA adapters: gradients with respect to the
    activations through every matmul (as many FLOPs as its forward), weight gradients only for the adapters (a
    second forward's worth), and attention's two gradient products per forward product."""
    tokens = sum(lengths)
    return (tokens * (2 * shape.linear_params() + 2 * lora_flops_per_token(shape, lora_r, lora_targets))
            + 2 * sum(attention_flops(shape, n) for n in lengths) + 2 * shape.hidden * shape.vocab * logit_positions)
