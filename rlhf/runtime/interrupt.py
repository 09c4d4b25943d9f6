"""Ctrl-C during `rlhf train`: one line from `rlhf train`, not a traceback from each process it interrupted.

A terminal's Ctrl-C reaches the whole foreground process group: `rlhf train`, the `dvc` it runs and the stage DVC
runs. The stage stops without a traceback (runtime/stage.py `guarded`: exit code 130); DVC, which ignores SIGINT
while a stage runs, then reports the stage as failed. `dvc` therefore runs through this module's `__main__`, which
is DVC's own command line with that report (and DVC's "interrupted by the user") left out, exiting 130 and leaving
the name of the stage it stopped in where `rlhf train` asked (STAGE_FILE_ENV). `wait` keeps `rlhf train` waiting
for its child through the Ctrl-C, so that DVC finishes its own bookkeeping before `rlhf train` says where it
stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

INTERRUPTED = 130  # 128 + SIGINT: the shell's exit code for a command stopped by Ctrl-C
STAGE_FILE_ENV = "RLHF_INTERRUPTED_STAGE_FILE"


def wait(cmd: list[str], env: dict) -> int:
    """Run cmd in this process group (a terminal's Ctrl-C reaches it too) to its end, through Ctrl-C; its exit
    code, or INTERRUPTED where it or this process was interrupted. A second Ctrl-C asks it to stop (SIGTERM)."""
    import subprocess

    proc = subprocess.Popen(cmd, env=env)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            if interrupted:
                proc.terminate()
            interrupted = True
    return INTERRUPTED if interrupted or code in (INTERRUPTED, -2) else code


def quiet_interrupts() -> None:
    """A Ctrl-C that lands where nothing handles it (an import, say) ends this process without a traceback; Python
    still reports the process as stopped by SIGINT."""
    previous = sys.excepthook

    def hook(kind, value, tb):
        if not issubclass(kind, KeyboardInterrupt):
            previous(kind, value, tb)

    sys.excepthook = hook


class DvcInterrupted(KeyboardInterrupt):
    """`dvc` stopped by Ctrl-C; stage: the stage it stopped in ("" when DVC was between stages)."""

    def __init__(self, stage: str = ""):
        super().__init__(stage)
        self.stage = stage


def run_dvc(args: list[str], env: dict) -> int:
    """`dvc ARGS` through this module; its exit code, or DvcInterrupted raised on Ctrl-C."""
    import tempfile

    fd, name = tempfile.mkstemp(prefix="rlhf-dvc-stage-")
    os.close(fd)
    try:
        code = wait([sys.executable, "-m", __name__, *args], {**env, STAGE_FILE_ENV: name})
        if code == INTERRUPTED:
            raise DvcInterrupted(Path(name).read_text())
        return code
    finally:
        os.unlink(name)


@contextlib.contextmanager
def deferred():
    """Ctrl-C waits until the block is done (in the main thread): bookkeeping that must not be cut in half."""
    got: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: got.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


def _stopped_by_interrupt(record: logging.LogRecord) -> str | None:
    """The stage name (or "" when none) if the record reports an interruption, else None."""
    if not record.exc_info or record.exc_info[1] is None:
        return None
    error: BaseException | None = record.exc_info[1]
    chain = []
    while error is not None and len(chain) < 10:
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, KeyboardInterrupt) for e in chain):
        return ""
    if not any(type(e).__name__ == "StageCmdFailedError" and re.search(rf"exited with ({INTERRUPTED}|-2)$", str(e))
               for e in chain):
        return None
    named = re.search(r"failed to reproduce '([^']+)'", str(chain[0]))
    return named.group(1) if named else ""


def dvc_main(argv: list[str]) -> int:
    """DVC's command line, less its report of an interruption (see the module's docstring)."""
    import logging

    stopped: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        stage = _stopped_by_interrupt(record)
        if stage is not None:
            stopped.append(stage)
        return stage is None

    try:
        import dvc.cli  # importing dvc sets up its log handlers

        for handler in logging.getLogger("dvc").handlers:
            handler.addFilter(keep)
        code = dvc.cli.main(argv)
    except KeyboardInterrupt:  # outside DVC's own handling (its import, its exit)
        stopped.append("")
    if not stopped:
        return code
    if os.environ.get(STAGE_FILE_ENV) and stopped[0]:
        with open(os.environ[STAGE_FILE_ENV], "w") as out:
            out.write(stopped[0])
    return INTERRUPTED


if __name__ == "__main__":  # `python -m rlhf.runtime.interrupt ARGS`: `dvc ARGS` for `rlhf train`
    quiet_interrupts()
    sys.exit(dvc_main(sys.argv[1:]))
