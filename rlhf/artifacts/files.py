"""Files of the project: atomic writes, JSON metrics, the iteration state file and crash-safe folder swaps."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

STATE_FILE = "state.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))



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
