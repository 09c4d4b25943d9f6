"""How a stage script runs: `python stages/<name>.py [--params FILE] [ARGS]`.

`run_stage(main)` reads and validates the params, hands the script over to the warm process when
`runtime.warm_start` is on (rlhf/runtime/warm_start.py: the script then runs in a fork of a process that has already
imported torch/transformers/peft), and turns the expected failures into one line on stderr and exit code 2. Stage
scripts import their heavy modules inside `main`, after the hand-over, so a warm run never imports torch twice.

A stage runs the `rlhf` package of its own workspace (the folder above `stages/`): that is the code whose hash
dvc.yaml records for it. Each script puts its workspace first on `sys.path` before its first `rlhf` import (a
`pip install -e` would otherwise resolve `rlhf` to the folder it was installed from, whichever workspace the stage
runs in: a queued `dvc exp run` runs in a copy under .dvc/tmp/exps), and `run_stage` refuses to go on with any other.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from rlhf.runtime.interrupt import quiet_interrupts
from rlhf.runtime.log import log

quiet_interrupts()  # Ctrl-C while a stage imports: the command that ran it says where it stopped
EXPECTED_ERRORS_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def run_stage(main: Callable[..., object], warm: bool = True, argv: list[str] | None = None) -> None:
    """warm=False for stages that never import torch (the hand-over would cost more than it saves)."""
    problem = foreign_package(main)
    if problem:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        sys.exit(EXPECTED_ERRORS_EXIT)
    argv = list(sys.argv if argv is None else argv)
    script = sys.modules.get(main.__module__)  # the stage script (__main__): its docstring says what the stage does
    parser = argparse.ArgumentParser(prog=Path(argv[0]).name, description=((script and script.__doc__) or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", "-p", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("args", nargs="*", help="stage arguments")
    ns = parser.parse_args(argv[1:])
    sys.exit(guarded(lambda: _run(main, argv, ns.params, ns.args, warm)))


def foreign_package(main: Callable[..., object]) -> str | None:
    """Why the stage that defines `main` must not run with this `rlhf` package (None if it may): the package must be
    the one in the script's workspace, whether the script runs directly, under torchrun or in a warm worker."""
    script = getattr(main, "__globals__", {}).get("__file__")
    if not script:
        return None
    script = Path(script).resolve()
    workspace, package = script.parents[1], Path(__file__).resolve().parents[1]
    if package == workspace / "rlhf":
        return None
    return (f"{script.relative_to(workspace)} would run the rlhf package in {package}, not the one of its workspace "
            f"{workspace}; a stage runs its own workspace's rlhf/ (the code dvc.yaml hashes for it)")


def _run(main: Callable[..., object], argv: list[str], params_file: Path, args: list[str], warm: bool) -> int:
    from rlhf.config.params import load_params
    from rlhf.runtime.progress import quiet_libraries

    params = load_params(params_file)
    quiet_libraries(params.runtime.progress)  # here, so that the warm process is started with it too
    if warm and params.runtime.warm_start:
        from rlhf.runtime import warm_start

        code = warm_start.delegate(argv)
        if code is not None:
            return code
    if warm or params.runtime.threads > 0:  # model stages: one explicit count, served warm or not (numerics.py)
        from rlhf.runtime.numerics import set_threads

        set_threads(params.runtime.threads)
    start = time.perf_counter()
    main(params, *args)
    # One wall-time line per stage (after its own line): what `dvc repro` spent where, for the user to read.
    log(f"{' '.join([Path(argv[0]).stem, *args])}: stage took {time.perf_counter() - start:.1f} s")
    return 0


def configure(params):
    """A command's process set up as the params say: library progress output, torch threads (torch imported only
    when asked: commands without models never import it). Returns the params."""
    from rlhf.runtime.progress import quiet_libraries

    quiet_libraries(params.runtime.progress)
    if params.runtime.threads > 0:
        import torch

        torch.set_num_threads(params.runtime.threads)
    return params


def guarded(fn: Callable[[], int | None]) -> int:
    """Run fn; an expected failure (bad params, missing or invalid artifact, model or state problem, non-finite
    numbers) becomes `error: <one line>` on stderr and exit code 2, with no traceback; Ctrl-C, exit code 130."""
    try:
        from rlhf.config.params import ParamsError
        from rlhf.errors import ArtifactError, ModelError, StateError  # torch- and pandas-free
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    try:
        return fn() or 0
    except (ParamsError, ModelError, ArtifactError, StateError, FloatingPointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXPECTED_ERRORS_EXIT
    except KeyboardInterrupt:  # Ctrl-C: the command that ran this one says where it stopped (runtime/interrupt.py)
        return INTERRUPTED_EXIT

