"""Random-weight copies of the Qwen3 + Skywork architectures (Qwen3-0.6B policy, Skywork-Reward-V2-Qwen3-8B reward), full
size or shrunken, built from a configs folder laid out like the project's `models/configs/` (the real configs and
the real Qwen3 tokenizer). Used by the tests, the memory report, the GPU check and the real-size CPU run; the hub
models are loaded by id instead when a network is there. The folder is always passed in: nothing here reads the
source tree."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

QWEN3 = "qwen3-0.6b"  # config.json, generation_config.json and the tokenizer files
SKYWORK_CONFIG = "skywork-reward-v2-qwen3-8b/config.RECONSTRUCTED.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")

def qwen3_config(config_file: Path, **overrides):
    from transformers import Qwen3Config

    raw = json.loads(Path(config_file).read_text())
    for key in ("architectures", "transformers_version", "torch_dtype"):
        raw.pop(key, None)
    raw.update(overrides)
    layers = raw["num_hidden_layers"]
    # AutoConfig keeps 28 layer_types when num_hidden_layers is overridden; build them to match.
    raw.update({"max_window_layers": layers, "layer_types": ["full_attention"] * layers})
    return Qwen3Config(**raw)


@contextlib.contextmanager
def default_dtype(name: str):
    """Parameters created in `name` from the start, instead of built in fp32 and cast."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, name))
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def copy_tokenizer(configs: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(configs) / QWEN3 / name, out_dir / name)


def build_policy(configs: Path, out_dir: Path, seed: int = 0, torch_dtype: str = "float32", **overrides) -> Path:
    from transformers import Qwen3ForCausalLM

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with default_dtype(torch_dtype):
        model = Qwen3ForCausalLM(qwen3_config(Path(configs) / QWEN3 / "config.json", **overrides))
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copy2(Path(configs) / QWEN3 / "generation_config.json", out_dir / "generation_config.json")
    copy_tokenizer(configs, out_dir)
    return out_dir


def build_reward(configs: Path, out_dir: Path, seed: int = 1, torch_dtype: str = "float32", **overrides) -> Path:
    from transformers import Qwen3ForSequenceClassification

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with default_dtype(torch_dtype):  # the 8B model never exists in fp32 (30 GB)
        model = Qwen3ForSequenceClassification(qwen3_config(Path(configs) / SKYWORK_CONFIG, num_labels=1, **overrides))
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer(configs, out_dir)
    return out_dir
