"""The policy's starting point: the base model, with the sft stage's LoRA adapter merged in when it trained one.

The merged model is the shared base of an iteration, so "the policy with its adapter disabled" (the reference) is
the SFT policy, the LoRA critic sits on it, and the PPO adapter starts at B = 0 on top of it (ratio 1 and KL 0 at
iteration 0). The merge runs in fp32 and is then cast to the run's dtype, so it is the same on every device.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rlhf.errors import StateError
from rlhf.models.actors import quiet_peft_wrap
from rlhf.models.sources import DTYPES, load_causal_lm

SFT_FILE = "sft.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def sft_record(sft_dir: Path) -> dict | None:
    """The sft stage's record when it trained an adapter; None when it is off or never ran (an older project)."""
    path = Path(sft_dir) / SFT_FILE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("enabled") else None


def adapter_digest(sft_dir: Path) -> str:
    return hashlib.sha256((Path(sft_dir) / ADAPTER_WEIGHTS).read_bytes()).hexdigest()


def sft_fingerprint(sft_dir: Path) -> str | None:
    """What an iteration state records of its start (state.json "sft"): the SFT adapter's digest, or None."""
    record = sft_record(sft_dir)
    return None if record is None else record["adapter_sha256"]


def check_same_start(state: dict, sft_dir: Path, state_dir: Path) -> None:
    """A state's adapters were trained on top of one start; on another they would mean something else."""
    now = sft_fingerprint(sft_dir)
    if state.get("sft") != now:
        was = "the base" if state.get("sft") is None else f"SFT adapter {state['sft'][:12]}"
        raise StateError(f"{state_dir} was trained from {was}, but {sft_dir} now holds "
                         f"{'no SFT adapter' if now is None else f'SFT adapter {now[:12]}'} (sft params changed "
                         "since `rlhf init`?): restore them, or start over with `rlhf init --force`")


def load_policy_start(base_dir: Path, sft_dir: Path, dtype: str, trust_remote_code: bool = False,
                      attention: str | None = None, **extra):
    """The causal LM every iteration's adapters sit on, in `dtype` (extra: from_pretrained's placement arguments,
    used when there is no SFT adapter to merge on the host first)."""
    if sft_record(sft_dir) is None:
        return load_causal_lm(base_dir, dtype, trust_remote_code, attention, **extra)
    from peft import PeftModel

    base = load_causal_lm(base_dir, "float32", trust_remote_code, attention)
    with quiet_peft_wrap():
        merged = PeftModel.from_pretrained(base, sft_dir).merge_and_unload()
    return merged.to(DTYPES[dtype]).eval()


def stacked_adapter(first: Path, second: Path, out_dir: Path) -> None:
    """One LoRA adapter equal to applying `first`, then `second` on top: s1·B1A1 + s2·B2A2 = [s1·B1, s2·B2]·[A1; A2],
    an adapter of rank r1 + r2 with scale 1 (lora_alpha = r). Exact up to rounding; plain peft loads it on the base."""
    from safetensors.torch import load_file, save_file

    configs = [json.loads((Path(d) / "adapter_config.json").read_text()) for d in (first, second)]
    weights = [load_file(str(Path(d) / ADAPTER_WEIGHTS)) for d in (first, second)]
    if set(weights[0]) != set(weights[1]):
        raise StateError(f"{first} and {second} adapt different modules; they cannot be stacked into one adapter")
    if any(c.get("use_dora") for c in configs):
        raise StateError("DoRA adapters cannot be stacked into one LoRA adapter")
    scales = [c["lora_alpha"] / (c["r"] ** 0.5 if c.get("use_rslora") else c["r"]) for c in configs]
    stacked = {}
    for name in weights[0]:
        if ".lora_A." in name:
            stacked[name] = torch.cat([w[name] for w in weights], dim=0).contiguous()  # (r1 + r2, in)
        elif ".lora_B." in name:
            stacked[name] = torch.cat([s * w[name] for s, w in zip(scales, weights)], dim=1).contiguous()  # (out, r1+r2)
        else:
            raise StateError(f"{name}: only plain LoRA A/B weights can be stacked")
    rank = sum(c["r"] for c in configs)
    config = {**configs[1], "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(stacked, str(out_dir / ADAPTER_WEIGHTS))
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
