"""`rlhf torchrun ARGS`: torchrun itself — its arguments, its agent, its c10d rendezvous — with its failures said in
one line.

Plain torchrun reports a node that never reaches the rendezvous, or a worker that died, as pages of agent traceback
that do not name the endpoint; with `--rdzv-conf join_timeout` unset it first waits ten minutes. Here the same agent
runs in this process, its log lines are held back, and what ended the run is one `error:` line naming the rendezvous
endpoint and id, exit code 2:

- a rendezvous that did not complete within join_timeout (a node not started, or started with another endpoint/id);
- an endpoint that cannot be reached (wrong host, port closed, the first node's agent gone);
- a local worker that failed: a worker that already printed its own `error:` line (exit code 2, e.g. a peer lost in a
  collective) is not repeated; any other exit is named with its rank, exit code or signal.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rlhf.runtime.stage import EXPECTED_ERRORS_EXIT

RENDEZVOUS_ENV = "RLHF_RENDEZVOUS"
REPORTED_ENV = "RLHF_RANK_REPORTED"


class _HoldBack(logging.Filter):
    """torchrun's agent logs (per-worker banners, exit-barrier waits, the failure report with its traceback) stay out
    of the stage's output; every other logger is left as it was."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("torch.distributed")


def main(argv: list[str]) -> int:
    # c10d's C++ side logs each failed store connection with a native stack trace, in the agent and in the workers,
    # before raising what is reported here in one line. A TORCH_CPP_LOG_LEVEL set by the user wins.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    from torch.distributed.run import parse_args

    args = parse_args(argv)
    where = f"rendezvous {args.rdzv_endpoint or 'localhost'} (id {args.rdzv_id}, {args.nnodes} nodes)"
    os.environ[RENDEZVOUS_ENV] = where  # the workers name it too when they lose their peers
    # A worker that has said why it failed leaves this file, and the agent adds no line of its own. It is looked at
    # once the agent has stopped its workers (torchrun's agent does that before its error leaves run()), so no worker
    # can still be writing its line.
    said = Path(tempfile.mkdtemp(prefix="rlhf-torchrun-")) / "reported"
    os.environ[REPORTED_ENV] = str(said)
    # torch hangs its own stderr handlers on the "torch" loggers; a record that reaches none goes to lastResort.
    hold_back = _HoldBack()
    for name in ("torch", "torch.distributed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(hold_back)
    fallback = logging.StreamHandler(sys.stderr)
    fallback.addFilter(hold_back)
    logging.getLogger().addHandler(fallback)
    try:
        message = _launch(args, where)
    finally:
        reported = said.exists()
        shutil.rmtree(said.parent, ignore_errors=True)
    if message is None:
        return 0
    if message and not reported:
        print(f"error: {message}", file=sys.stderr, flush=True)
    return EXPECTED_ERRORS_EXIT


def _launch(args, where: str) -> str | None:
    """None: every rank finished; "": failed, and the failing worker said why; else the failure in one line."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import run

    try:
        run(args)
    except RendezvousTimeoutError:
        timeout = _conf(args.rdzv_conf, "join_timeout", "600")
        return (f"{where}: not every node joined within join_timeout={timeout} s; each node must run this same "
                "launcher line, reach that endpoint and use that id")
    except RendezvousError as err:
        return f"{where}: cannot be reached or was closed: {_first_line(err.__cause__ or err)}"
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode == EXPECTED_ERRORS_EXIT:
            return ""  # the worker printed its own `error:` line
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        return f"{where}: rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) {how}; its output above says why"
    return None


def _conf(conf: str, key: str, default: str) -> str:
    for item in (conf or "").split(","):
        name, _, value = item.partition("=")
        if name.strip() == key:
            return value.strip()
    return default


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
