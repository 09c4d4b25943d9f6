"""One line per event on stderr, flushed at once (stages run under `dvc repro`, whose output is a log).

Under torchrun only global rank 0 speaks (RANK; not LOCAL_RANK, which is 0 once per node): N nodes print each line
once, not N times. A failure is not logged here; each rank that fails prints its own `error:` line."""

from __future__ import annotations

import os
import sys


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    print(msg, file=sys.stderr, flush=True)
