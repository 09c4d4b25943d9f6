"""`rlhf report`: true LoRA trainable-parameter counts and a memory estimate per component, computed on the meta
device from the real configs (no weights needed). Defaults to the mission architectures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config.params import Params
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


def count_policy(configs: Path, lora_r: int, lora_alpha: float, targets: tuple[str, ...]) -> Counts:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    cfg = qwen3_config(Path(configs) / QWEN3 / "config.json", num_hidden_layers=28)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(cfg)
    base = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    peft_model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=list(targets)))
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return Counts(base, lora, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                  cfg.num_attention_heads, cfg.vocab_size)


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


def render(params: Params, configs: Path) -> str:
    c = count_policy(configs, params.lora.r, params.lora.alpha, params.lora.target_modules)
    lines = [f"Qwen3-0.6B with LoRA r={params.lora.r} on {','.join(params.lora.target_modules)}: "
             f"{c.lora:,} trainable of {c.base + c.lora:,} ({100 * c.lora / (c.base + c.lora):.2f}%)", "",
             "| component | GiB | notes |", "|---|---:|---|"]
    rows = memory_table(params, configs)
    lines += [f"| {name} | {gib:.2f} | {note} |" for name, gib, note in rows]
    lines.append(f"| **total (one process)** | **{sum(r[1] for r in rows):.2f}** | |")
    return "\n".join(lines)
