"""Every random choice derives its seed from (params.seed, stage, iteration, ...) through one function."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from the global seed and labels such as ("rollout", iteration)."""
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
