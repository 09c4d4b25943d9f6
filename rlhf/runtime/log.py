"""One line per event on stderr, flushed at once (stages run under `dvc repro`, whose output is a log)."""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
