"""`rlhf preset NAME`: switch params.yaml to a named configuration in one step (comments kept).

`qwen3-skywork`: Qwen3-0.6B policy/critic/reference with LoRA r=32 on the 7 projections, Skywork-Reward-V2-Qwen3-8B
reward (sequence classifier, its own chat template), prompts from trl-lib/tldr, bf16 everywhere, GPU-sized
batches and 4 PPO epochs.
`embedded`: back to the CPU default (SmolLM2-135M-Instruct + MiniLM similarity, local TL;DR sample)."""

from __future__ import annotations

from pathlib import Path

SUMMARY_INSTRUCTION = "Summarize the following Reddit post in one sentence.\n\n{post}\n\nOne-sentence summary:"

PRESETS: dict[str, dict] = {
    "qwen3-skywork": {
        "policy_model": {"id": "Qwen/Qwen3-0.6B", "dtype": "bfloat16", "prompt_format": "chat",
                         "instruction": SUMMARY_INSTRUCTION, "attention": "auto"},
        "reward_model": {"id": "Skywork/Skywork-Reward-V2-Qwen3-8B", "kind": "classifier", "dtype": "bfloat16",
                         "max_length": 4096, "token_budget": 16384, "attention": "auto"},
        "data": {"source": "trl-lib/tldr", "split": "train"},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
        "critic": {"mode": "lora", "lora_r": 32, "lora_alpha": 64},
        # GPU-sized work units: 64 prompts sampled in one chunk, micro-batches of 8 × ~565 tokens (~11 GiB of
        # activations kept for backward on Qwen3-0.6B, see `rlhf report`): the update stays below the reward
        # stage's 8B weights, so no stage overruns a 24 GB GPU
        "rollout": {"batch_size": 64, "micro_batch_size": 8, "generation_chunk": 64},
        "ppo": {"epochs": 4},
        # on a GPU the reference recomputes the prompts' keys/values faster than it reads them back
        "eval": {"generation_chunk": 64, "reference_cache": None},
        "runtime": {"device": "auto"},
    },
    "embedded": {
        "policy_model": {"id": "embedded:smollm2-135m-instruct", "dtype": "auto", "prompt_format": "chat",
                         "instruction": SUMMARY_INSTRUCTION, "attention": "auto"},
        "reward_model": {"id": "embedded:all-minilm-l6-v2", "kind": "similarity", "dtype": "float32",
                         "max_length": 1024, "token_budget": 8192, "attention": "auto"},
        "data": {"source": "local", "split": "validation"},
        "lora": {"r": 32, "alpha": 64, "dropout": 0.0},
        "critic": {"mode": "lora", "lora_r": 32, "lora_alpha": 64},
        "rollout": {"batch_size": 32, "micro_batch_size": 4, "generation_chunk": 32},
        "ppo": {"epochs": 1},
        "eval": {"generation_chunk": 64, "reference_cache": ".cache/reference"},
        "runtime": {"device": "auto"},
    },
}


def apply(name: str, params_file: Path, revisions: dict[str, str | None] | None = None) -> dict:
    """Merge the preset into params_file, validate the result, and write it back only if it is valid."""
    from ruamel.yaml import YAML

    from rlhf.config.params import ParamsError, parse_params, read_yaml

    if name not in PRESETS:
        raise ParamsError(f"preset: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
    read_yaml(params_file)  # a repeated key or broken YAML: our one line, not ruamel's traceback
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(params_file.read_text())
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            doc[section][key] = value
    for section, rev in (revisions or {}).items():
        doc[section]["revision"] = rev
    import io

    buf = io.StringIO()
    yaml.dump(doc, buf)
    import yaml as pyyaml

    parse_params(pyyaml.safe_load(buf.getvalue()))  # raises before anything is written
    from rlhf.artifacts.files import atomic_write_text

    atomic_write_text(params_file, buf.getvalue())
    return PRESETS[name]
