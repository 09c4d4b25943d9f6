"""Progress bars with tokens/s and ETA; silent when stderr is not a terminal or under CI (runtime.progress: auto)."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def enabled(mode: str) -> bool:
    if mode == "off":
        return False
    if mode == "on":
        return True
    return sys.stderr.isatty() and not os.environ.get("CI")


def bar(total: int, desc: str, unit: str, mode: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled(mode), leave=False,
                dynamic_ncols=True)
