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


def token_ticker(progress: tqdm):
    """A generate() stopping criterion that never stops: it advances the bar by one token per live sequence."""
    import torch
    from transformers import StoppingCriteria

    class Tick(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            progress.update(int(input_ids.shape[0]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return Tick()
