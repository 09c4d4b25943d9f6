"""TRL 1.12 PPOTrainer on the benchmark's work, in its own environment: the TRL venv of bench/compare_trl.py (CPU) or
the carried wheels of bench/gpu_run.sh (part c of bench/gpu_check.py).

Prints one JSON line (and writes it to the second argument, if given): wall seconds per phase, peak RSS, peak GPU
memory allocated and reserved, generated tokens."""

from __future__ import annotations

import json
import math
import resource
import sys
import time

import pandas as pd
import torch


def main(cfg_path: str, out_path: str | None = None) -> None:
    cfg = json.loads(open(cfg_path).read())
    t_start = time.perf_counter()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    import trl.experimental.ppo.ppo_trainer as ppo_module

    device = cfg.get("device", "cpu")
    if device == "cpu":
        torch.set_num_threads(cfg["threads"])
    dtype = getattr(torch, cfg["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"], padding_side="left")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # TRL's TL;DR example: pad ≠ EOS, no resize
    policy = AutoModelForCausalLM.from_pretrained(cfg["policy"], dtype=dtype)
    # The critic: compare_trl starts it from the reward model, gpu_check from the policy (a fresh score head).
    value = AutoModelForSequenceClassification.from_pretrained(cfg.get("value", cfg["reward"]), num_labels=1,
                                                               dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1, dtype=dtype)
    prompts = pd.read_parquet(cfg["prompts"])["prompt_ids"].tolist()
    dataset = Dataset.from_dict({"input_ids": [list(map(int, p)) for p in prompts]})
    t_loaded = time.perf_counter()

    gen_seconds = [0.0]
    original = ppo_module.batch_generation

    def timed_generation(*args, **kwargs):
        t = time.perf_counter()
        out = original(*args, **kwargs)
        gen_seconds[0] += time.perf_counter() - t
        return out

    ppo_module.batch_generation = timed_generation
    # TRL runs each micro-batch of a minibatch through policy and critic in one graph; gpu_check sizes the
    # micro-batch (and gradient checkpointing) by the memory model, compare_trl takes the whole batch at once.
    micro = cfg.get("micro_batch", len(prompts))
    accumulation = cfg.get("gradient_accumulation", 1)
    if cfg.get("checkpointing"):  # PPOTrainer turns on none itself; non-reentrant, as TRL's other trainers
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    args = PPOConfig(
        output_dir=cfg["out"], per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        num_mini_batches=cfg["num_minibatches"], total_episodes=len(prompts), num_ppo_epochs=cfg["epochs"],
        response_length=cfg["max_new_tokens"], temperature=cfg["temperature"], stop_token="eos",
        local_rollout_forward_batch_size=cfg["forward_batch"], kl_coef=cfg["kl_coef"], learning_rate=cfg["lr"],
        report_to=[], save_strategy="no", logging_strategy="no", seed=cfg["seed"], bf16=cfg["dtype"] == "bfloat16",
        use_cpu=device == "cpu", num_sample_generations=0, missing_eos_penalty=None,
    )
    lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                      target_modules=cfg["targets"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=dataset, peft_config=lora)
    t_train = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    t_end = time.perf_counter()
    on_gpu = device == "cuda"
    micro_steps = cfg["num_minibatches"] * math.ceil(len(prompts) // cfg["num_minibatches"] / micro)  # per epoch
    row = json.dumps({
        "system": "trl-1.12 PPOTrainer",
        "load_s": t_loaded - t_start + (t_train - t_loaded),
        "generate_s": gen_seconds[0],
        "score_and_update_s": t_end - t_train - gen_seconds[0],
        "total_s": t_end - t_start,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "generated_tokens": len(prompts) * cfg["max_new_tokens"],
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 1024**3 if on_gpu else 0.0,
        "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 1024**3 if on_gpu else 0.0,
        "gpu": torch.cuda.get_device_name() if on_gpu else None,
        "trl_version": trl.__version__,
        # accelerate steps the optimizer every `accumulation` micro-batches, counted across minibatches and epochs
        "optimizer_steps": cfg["epochs"] * micro_steps // accumulation,
    })
    print(row)
    if out_path:
        with open(out_path, "w") as f:
            f.write(row)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
