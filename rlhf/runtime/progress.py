"""Progress bars with tokens/s and ETA; silent when stderr is not a terminal or under CI (runtime.progress: auto)."""

from __future__ import annotations

import os
import sys


def enabled(mode: str) -> bool:
    if mode == "off":
        return False
    if mode == "on":
        return True
    return sys.stderr.isatty() and not os.environ.get("CI")


def quiet_libraries(mode: str) -> None:
    """Without our bars, no library bars either: transformers draws "Loading weights" on every model load and
    huggingface_hub its download bars, which end up as lines of carriage returns in logs. The environment variable
    reaches both when they are imported later (and every child: dvc's stages, torchrun's ranks); a warm worker
    imported them before it read the params, so their switch is flipped directly."""
    if enabled(mode):
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # plain tqdm bars too (transformers' GGUF conversion), read when tqdm is imported
    if "transformers.utils.logging" in sys.modules:  # only if imported: importing transformers costs seconds
        sys.modules["transformers.utils.logging"].disable_progress_bar()  # also huggingface_hub's
    elif "huggingface_hub.utils" in sys.modules:
        sys.modules["huggingface_hub.utils"].disable_progress_bars()


def bar(total: int, desc: str, unit: str, mode: str):
    from tqdm.auto import tqdm  # here: the commands that only read params (rlhf check-params, ...) never draw a bar

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled(mode), leave=False,
                dynamic_ncols=True)
