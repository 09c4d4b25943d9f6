"""The sft stage's computation: LoRA fine-tuning of the policy on the human summaries of the training prompts (never
the held-out ones), the warm start N+ and OpenRLHF run before PPO. The target of a prompt is its human TL;DR followed
by the policy's EOS token, exactly what a finished rollout response looks like; the loss is the mean negative
log-likelihood over those target tokens, computed by the same packed passes PPO uses (temperature 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from rlhf.config.params import Lora, Sft
from rlhf.models.passes import length_sorted_groups, pack, token_logprobs
from rlhf.runtime.device import Device
from rlhf.runtime.progress import bar


@dataclass(frozen=True)
class Example:
    prompt_id: int
    prompt_ids: list[int]
    target_ids: list[int]  # the human summary's tokens + EOS


def with_lora(base: torch.nn.Module, lora: Lora, device: Device) -> torch.nn.Module:
    """The base wrapped in a fresh LoRA adapter (B = 0) of `lora`'s rank and targets, without dropout, on the
    device, with the fused adapter forward PPO uses."""
    from peft import get_peft_model

    from rlhf.models.actors import adopt_lora_layers, lora_config, quiet_peft_wrap

    with quiet_peft_wrap():
        model = get_peft_model(base, lora_config(lora.r, lora.alpha, 0.0, lora.target_modules))
    adopt_lora_layers(model, device)
    return model.to(device.where).eval()  # dropout is off everywhere


def summary_target(tokenizer, text: str, eos_id: int) -> list[int]:
    """The tokens a policy should produce after the prompt: the summary as the sampler would decode it (the chat
    template's assistant turn starts on a new line, so no leading space) and the EOS that ends a rollout."""
    return [*tokenizer(text.strip(), add_special_tokens=False)["input_ids"], eos_id]


def build_examples(prompts: pd.DataFrame, tokenizer, eos_id: int, max_tokens: int, limit: int | None,
                   seed: int) -> tuple[list[Example], int]:
    """Up to `limit` examples from a seeded shuffle of the prompts frame; a summary longer than `max_tokens` (EOS
    included; rollout.max_new_tokens, the longest response PPO ever samples) is skipped. Returns (examples, skipped)."""
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    examples, skipped = [], 0
    for i in order:
        if limit is not None and len(examples) == limit:
            break
        row = prompts.iloc[i]
        target = summary_target(tokenizer, row["reference"], eos_id)
        if len(target) > max_tokens:
            skipped += 1
            continue
        examples.append(Example(int(row["prompt_id"]), list(map(int, row["prompt_ids"])), target))
    return examples, skipped


def micro_batches(examples: Sequence[Example], size: int) -> list[list[int]]:
    """Indices into `examples`, grouped by length (less padding), in the order the examples come."""
    groups = length_sorted_groups([len(e.prompt_ids) + len(e.target_ids) for e in examples], size)
    out: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return [out[g] for g in sorted(out)]


def target_nll(model, examples: Sequence[Example], device: Device) -> torch.Tensor:
    """Σ over the examples' target tokens of −log p(token | prompt, earlier tokens), fp32 scalar."""
    packed = pack([e.prompt_ids for e in examples], [e.target_ids for e in examples], device.where)
    with device.compute():
        logprobs, _ = token_logprobs(model, packed, 1.0)  # (b, R), zero on padding
    return -logprobs.sum()


@torch.no_grad()
def mean_nll(model, examples: Sequence[Example], device: Device, micro_batch_size: int) -> float:
    """Mean NLL per target token over `examples` (the held-out check: before vs after training)."""
    total = sum(float(target_nll(model, [examples[i] for i in group], device))
                for group in micro_batches(examples, micro_batch_size))
    return total / sum(len(e.target_ids) for e in examples)


def epoch_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """A seeded shuffle of range(n) cut into optimizer batches (the last may be short)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train(model, trainable: list[torch.nn.Parameter], examples: Sequence[Example], cfg: Sft, device: Device,
          seed: int, progress_mode: str) -> list[dict]:
    """cfg.epochs over the examples with AdamW; each step's loss is the mean NLL over its batch's target tokens
    (micro-batches accumulate Σ NLL / the batch's token count). Returns one record per optimizer step."""
    from rlhf.runtime.seeding import derive_seed

    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0, fused=device.fused_optimizer)
    history = []
    steps = cfg.epochs * math.ceil(len(examples) / cfg.batch_size)
    with bar(total=steps, desc="sft", unit="step", mode=progress_mode) as progress:
        for epoch in range(cfg.epochs):
            for batch in epoch_batches(len(examples), cfg.batch_size, derive_seed(seed, "sft-epoch", epoch)):
                chosen = [examples[i] for i in batch]
                tokens = sum(len(e.target_ids) for e in chosen)
                loss_sum = 0.0
                for group in micro_batches(chosen, cfg.micro_batch_size):
                    nll = target_nll(model, [chosen[i] for i in group], device)
                    if not torch.isfinite(nll):
                        raise FloatingPointError(f"sft: non-finite loss at step {len(history)}; nothing written")
                    (nll / tokens).backward()
                    loss_sum += float(nll.detach())
                norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf)
                if not torch.isfinite(norm):
                    raise FloatingPointError(f"sft: non-finite gradient at step {len(history)}; nothing written")
                opt.step()
                opt.zero_grad(set_to_none=True)
                history.append({"step": len(history), "epoch": epoch, "loss": loss_sum / tokens,
                                "grad_norm": float(norm), "tokens": tokens})
                progress.update(1)
    return history


def write_loss_curve(history: Sequence[dict], path) -> None:
    """Per-step training loss and gradient norm as a TSV `dvc plots` reads (header only when sft is off)."""
    from rlhf.artifacts.files import atomic_write_text

    atomic_write_text(path, "step\tloss\tgrad_norm\n"
                      + "".join(f"{h['step']}\t{h['loss']}\t{h['grad_norm']}\n" for h in history))
