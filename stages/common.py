"""Small helpers shared by the stage modules: iteration state, JSON metrics, seeds, folder swaps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from stages.schema import atomic_write_text


class ModelError(RuntimeError):
    """A model could not be made available; the message is one line for the user."""


class StateError(RuntimeError):
    """The project's iteration state is missing or inconsistent; one line for the user."""

STATE_FILE = "state.json"


def read_state(state_dir: str | Path) -> dict:
    recover_dir(Path(state_dir))
    path = Path(state_dir) / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no iteration state; run `rlhf init` (or `rlhf train`) first")
    return json.loads(path.read_text())


def write_json(path: str | Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from the global seed and labels such as ("rollout", iteration)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def recover_dir(final: Path) -> None:
    """Finish or undo a swap that a crash interrupted between its two renames."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)  # the old folder is whole; a leftover .tmp is cleared by the next fresh_tmp_dir


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written temp folder into place; a crash leaves the old folder or the new one, never half."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    recover_dir(final)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def fresh_tmp_dir(final: Path) -> Path:
    tmp = Path(final).with_name(f".{Path(final).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
