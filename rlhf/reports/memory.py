"""`rlhf report`: true LoRA trainable-parameter counts and a memory estimate per component, computed on the meta
device from the real configs (no weights needed). Defaults to the Qwen3 + Skywork architectures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config.params import Params
from rlhf.models.actors import quiet_peft_wrap
from rlhf.models.architectures import QWEN3, SKYWORK_CONFIG, qwen3_config

GiB = 1024**3


@dataclass(frozen=True)
class Counts:
    base: int
    lora: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_heads: int
    head_dim: int


def count_policy(configs: Path, lora_r: int, lora_alpha: float, targets: tuple[str, ...]) -> Counts:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(Path(configs) / QWEN3 / "config.json", num_hidden_layers=28)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    base = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    with quiet_peft_wrap():
        peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=list(targets)))
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return Counts(base, lora, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                  cfg.num_attention_heads, cfg.vocab_size, cfg.num_key_value_heads, cfg.head_dim)


def count_reward(configs: Path) -> int:
    from transformers import Qwen3ForSequenceClassification

    cfg = qwen3_config(Path(configs) / SKYWORK_CONFIG, num_labels=1, num_hidden_layers=36)
    with torch.device("meta"):
        model = Qwen3ForSequenceClassification(cfg)
    return sum(p.numel() for p in model.parameters())


def activation_bytes(c: Counts, micro_batch: int, seq: int, response: int) -> int:
    """Rough bf16 activations kept for backward in one micro-batch (policy or critic pass):
    per layer and token ≈ 2 bytes × (16·hidden + 6·intermediate) plus attention probabilities (heads × seq²) when
    the attention kernel stores them, plus fp32 logits on response positions only (×2 for log-softmax)."""
    per_layer = micro_batch * seq * 2 * (16 * c.hidden + 6 * c.intermediate) + micro_batch * c.heads * seq * seq * 2
    logits = micro_batch * response * c.vocab * 4 * 2
    return c.layers * per_layer + logits


def memory_table(params: Params, configs: Path, prompt_tokens: int = 512) -> list[tuple[str, float, str]]:
    c = count_policy(configs, params.lora.r, params.lora.alpha, params.lora.target_modules)
    critic_lora = count_policy(configs, params.critic.lora_r, params.critic.lora_alpha, params.lora.target_modules).lora
    reward = count_reward(configs)
    seq = prompt_tokens + params.rollout.max_new_tokens
    bf16, fp32 = 2, 4
    critic_trainable = critic_lora + c.hidden + 1 if params.critic.mode == "lora" else c.base + c.hidden + 1
    rows = [
        ("policy + reference (shared bf16 base)", c.base * bf16 / GiB, f"{c.base:,} params"),
        ("policy LoRA (fp32 weights + grads)", c.lora * fp32 * 2 / GiB, f"{c.lora:,} trainable"),
        ("critic " + ("LoRA adapter on the shared base" if params.critic.mode == "lora" else "full copy (bf16)"),
         (critic_trainable * fp32 * 2 if params.critic.mode == "lora" else c.base * bf16 * 2) / GiB,
         f"{critic_trainable:,} trainable"),
        ("AdamW moments (policy + critic, fp32)", (c.lora + critic_trainable) * fp32 * 2 / GiB, "exp_avg + exp_avg_sq"),
        ("reward model Skywork-Reward-V2-Qwen3-8B (bf16, frozen)", reward * bf16 / GiB, f"{reward:,} params"),
        (f"activations (micro-batch {params.rollout.micro_batch_size} × {seq} tokens)",
         activation_bytes(c, params.rollout.micro_batch_size, seq, params.rollout.max_new_tokens) / GiB,
         "estimate, one pass kept for backward"),
    ]
    return rows


GPUS_GB = (24, 40, 80)  # the usual GPU sizes, in GB as sold (10^9 bytes)
RESERVE = 1.15  # allocator fragmentation and the CUDA context, on top of what the tensors need


def stage_peaks(params: Params, configs: Path, prompt_tokens: int = 512) -> list[tuple[str, float, str]]:
    """Computed (not measured) peak GiB of each model stage, which holds only its own models (the stages run one at a
    time and free what they hold before exit): weights + what its largest step keeps alive."""
    c = count_policy(configs, params.lora.r, params.lora.alpha, params.lora.target_modules)
    critic_lora = count_policy(configs, params.critic.lora_r, params.critic.lora_alpha, params.lora.target_modules).lora
    reward = count_reward(configs)
    rm = qwen3_config(Path(configs) / SKYWORK_CONFIG, num_labels=1, num_hidden_layers=36)
    r = params.rollout
    seq = prompt_tokens + r.max_new_tokens
    bf16, fp32 = 2, 4
    full = params.critic.mode == "full"
    critic = (c.base + c.hidden + 1) if full else (critic_lora + c.hidden + 1)  # trainable critic weights, fp32
    base = c.base * bf16
    def kv_cache_bytes(rows: int, tokens: int) -> int:  # keys and values of every layer, bf16
        return rows * tokens * c.layers * 2 * c.kv_heads * c.head_dim * bf16

    kv_cache = kv_cache_bytes(r.generation_chunk, seq)
    logits = r.micro_batch_size * r.max_new_tokens * c.vocab * fp32 * 2  # fp32 logits + one (b·R, V) temporary
    rollout = base + c.lora * fp32 + max(kv_cache + r.generation_chunk * c.vocab * fp32 * 2, logits)
    reference = base + (c.lora + critic) * fp32 + logits
    # One layer's activations at a time (no grad): hidden states, the MLP's two intermediate tensors, fp32 logits.
    reward_act = params.reward_model.token_budget * (4 * rm.hidden_size + 3 * rm.intermediate_size) * bf16
    reward_stage = reward * bf16 + reward_act
    # Trainable fp32 weights + grads + AdamW's two moments; the frozen base; one pass kept for backward.
    update = base + (c.lora + critic) * fp32 * 4 + activation_bytes(c, r.micro_batch_size, seq, r.max_new_tokens)
    # Evaluation: the policy decodes a chunk with its KV cache and keeps log π(·|s_t) of every position for the
    # KL (chunk × new tokens × vocabulary, fp32); then packed reference passes; the policy is freed before the RM.
    e = params.eval
    eval_seq = prompt_tokens + e.max_new_tokens
    eval_kv = kv_cache_bytes(e.generation_chunk, eval_seq)
    kept = e.generation_chunk * e.max_new_tokens * c.vocab * fp32
    # the reference's keys/values of every held-out prompt, held while the policy decodes (reference_cache.py)
    prompt_kv = kv_cache_bytes(params.data.eval_size, prompt_tokens)
    # the reference pass over one micro-batch's responses: its logits, their log-softmax and the KL's three temporaries
    eval_reference = r.micro_batch_size * e.max_new_tokens * c.vocab * fp32 * 5
    eval_policy = (base + c.lora * fp32 + eval_kv + kept + prompt_kv
                   + max(e.generation_chunk * c.vocab * fp32 * 2, eval_reference))
    return [
        ("rollout", rollout / GiB, f"policy + KV cache of {r.generation_chunk} × {seq} tokens"),
        ("reward", reward_stage / GiB, f"Skywork-Reward-V2-Qwen3-8B bf16 only, {params.reward_model.token_budget} "
                                       "tokens per forward"),
        ("reference", reference / GiB, "policy base (reference = adapter off) + critic, no grads"),
        ("update", update / GiB, f"critic {params.critic.mode}: weights, grads, AdamW moments, one micro-batch's "
                                 "activations"),
        ("evaluate", max(eval_policy, reward_stage) / GiB,
         f"policy + KV cache of {e.generation_chunk} × {eval_seq} tokens + kept log-probs for the KL "
         f"({kept / GiB:.2f} GiB) + the reference's keys/values of the {params.data.eval_size} held-out prompts "
         f"({prompt_kv / GiB:.2f} GiB), freed; then the reward model"),
    ]


def render_stages(params: Params, configs: Path) -> str:
    lines = ["| stage | peak GiB (computed) | " + " | ".join(f"fits {g} GB" for g in GPUS_GB) + " | holds |",
             "|---|---:|" + "---|" * len(GPUS_GB) + "---|"]
    for name, gib, note in stage_peaks(params, configs):
        fits = ["yes" if gib * GiB * RESERVE <= g * 1e9 else "no" for g in GPUS_GB]
        lines.append(f"| {name} | {gib:.2f} | " + " | ".join(fits) + f" | {note} |")
    return "\n".join(lines)


def rank_split(params: Params) -> str:
    """What more ranks (nodes × processes per node) change: not the memory per GPU, since data parallelism puts each
    stage's models whole on every rank, but each rank's share of the units the work is split in (rlhf/runtime/
    distributed.py), and how many ranks those units keep busy."""
    r = params.rollout
    chunks = -(-r.batch_size // r.generation_chunk)
    micro = r.batch_size // r.micro_batch_size
    per_step = micro // params.ppo.num_minibatches
    return (f"With W ranks (nodes × processes per node; docs/cluster.md) the memory per GPU is the same: every rank "
            f"holds its stage's models whole, the reward model on every rank of the reward stage. The ranks split the "
            f"work: {_n(chunks, 'generation chunk')} of {r.generation_chunk} prompts, {_n(micro, 'micro-batch')} of "
            f"{r.micro_batch_size} for the log-prob and value passes, {_n(per_step, 'micro-batch')} per update step, "
            f"so an update step keeps at most {_n(per_step, 'rank')} busy and generation at most {chunks}.")


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith("h") else "s")


def render(params: Params, configs: Path) -> str:
    c = count_policy(configs, params.lora.r, params.lora.alpha, params.lora.target_modules)
    lines = [f"Qwen3-0.6B with LoRA r={params.lora.r} on {','.join(params.lora.target_modules)}: "
             f"{c.lora:,} trainable of {c.base + c.lora:,} ({100 * c.lora / (c.base + c.lora):.2f}%)", "",
             "| component | GiB | notes |", "|---|---:|---|"]
    rows = memory_table(params, configs)
    lines += [f"| {name} | {gib:.2f} | {note} |" for name, gib, note in rows]
    lines.append(f"| **total (one process)** | **{sum(r[1] for r in rows):.2f}** | |")
    lines += ["", f"Per-stage peak (each stage holds only its own models; ×{RESERVE} for the allocator and CUDA "
                  "context when checking the fit):", "", render_stages(params, configs), "", rank_split(params)]
    return "\n".join(lines)
