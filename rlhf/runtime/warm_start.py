"""Warm start: import torch / transformers / peft once, run each model stage in a fork of that process.

Every model stage is its own command (that is what lets DVC cache and rerun stages one by one), and each of them
used to spend seconds importing the same libraries before touching a tensor. With `runtime.warm_start: true` the
first stage that needs them starts a *warm process* that does the imports (and nothing else: no tensor op, so no
thread pool exists yet and fork() is safe), then listens on a Unix socket. Each later `python stages/<name>.py`
connects (rlhf/runtime/stage.py), hands over its argv, working directory, environment and stdin/stdout/stderr, and
the warm process forks a fresh worker that runs the script. The worker is a new process per stage, exactly as before: it parses
params.yaml, loads its models and exits; only the already-imported modules are shared (copy-on-write).

What keeps this safe:
- The socket's name is a hash of the interpreter, the `rlhf` package (its folder and every file's contents), the
  installed packages' folders and the environment variables read at import time (the stage script itself is read
  afresh by each worker); edit the code or the environment and the next stage starts a new warm process, the old one
  exits when idle. A warm process serves only the code the command that started it hashed: it checks the package's
  contents against that hash before its imports and that no file of it changed during them (an edit reverted within
  those seconds would otherwise leave a mix of both versions loaded under the old hash), and exits if not.
- The stage's own process stays in the foreground for the whole stage: it forwards SIGINT/SIGTERM/SIGHUP to the worker,
  and if it dies (even by SIGKILL) its connection closes and the worker is killed at once, so `dvc repro`
  interruptions behave as with a direct run. The exit code (or signal) of the worker becomes the command's.
- The worker takes the command's CPU affinity, so a stage computes with the thread count it would have run with.
- Any problem reaching or starting the warm process falls back to running the stage in the command's own process.
- It exits after RLHF_WARM_IDLE seconds (default 300) without a stage; `rlhf warm stop` stops it now.
- Sockets live in a private per-user folder, or in $RLHF_WARM_DIR when set (the test suite uses its own).
- Processes started by torchrun (data-parallel runs) always run directly.
- On a GPU: the warm process never initialises CUDA (torch's availability check goes through NVML there, and it
  refuses to serve if an import initialised CUDA anyway), so each forked worker initialises CUDA itself.

Both ends of the protocol (the stage's side and the warm process) are in this one module, over the ~300-line
guideline, on purpose: they change together.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

IDLE_ENV = "RLHF_WARM_IDLE"  # seconds a warm process waits for the next stage before it exits (default 300)
READY_TIMEOUT_S = 180
WORKER_ENV = "RLHF_WARM_WORKER"  # set inside workers: a worker never delegates again
RUSAGE_ENV = "RLHF_WARM_RUSAGE"  # if set, the command writes the worker's resource usage (JSON) to this file
# oneDNN and ATen read their ISA caps (ONEDNN_MAX_CPU_ISA, DNNL_*, ATEN_CPU_CAPABILITY) once, at import: a worker
# forked from a process that imported under other caps would compute with kernels its command did not ask for.
KEY_ENV_PREFIXES = ("HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "TORCH", "PYTORCH", "OMP_", "MKL_", "KMP_",
                    "ONEDNN_", "DNNL_", "ATEN_", "CUDA", "NCCL", "PYTHON", "LD_", "MALLOC", "XDG_CACHE_HOME", "RLHF_",
                    "TQDM")
PRELOAD = ("torch", "pandas", "pyarrow.parquet", "transformers", "peft", "transformers.models.llama.modeling_llama",
           "transformers.models.qwen3.modeling_qwen3", "transformers.models.bert.modeling_bert",
           "rlhf.models.checkpoint", "rlhf.models.passes", "rlhf.models.sampling", "rlhf.models.scorers",
           "rlhf.models.attention", "rlhf.training.advantages", "rlhf.training.ppo_update", "rlhf.evaluation",
           "rlhf.data.prompts")
# CUDA cannot be used in a child forked after the parent initialised it ("Cannot re-initialize CUDA in forked
# subprocess"). The warm process only imports, but a library may ask torch.cuda.is_available() while importing,
# which initialises the CUDA driver; with this set torch answers through NVML instead, and workers (which get the
# stage's own environment) initialise CUDA themselves.
NVML_CHECK_ENV = "PYTORCH_NVML_BASED_CUDA_CHECK"
CODE_CHANGED_EXIT = 3  # the warm process's exit code when the package changed before or while it imported it
DIR_ENV = "RLHF_WARM_DIR"  # where the sockets live (default: a private folder per user under the temp dir)
MAX_MSG = 1 << 20


def package_dir() -> Path:
    return Path(__file__).resolve().parent.parent


def code_digest() -> str:
    """The `rlhf` package's files: their names and contents."""
    h = hashlib.sha256()
    for path in sorted(package_dir().rglob("*.py")):
        h.update(str(path.relative_to(package_dir())).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def code_stats() -> dict[str, tuple[int, int, int, int]]:
    """Each package file's inode, size and modification/change times: any write, rename or new file changes them
    (the change time cannot be set back), even an edit that is reverted to the same bytes."""
    stats = {}
    for path in package_dir().rglob("*.py"):
        st = path.stat()
        stats[str(path.relative_to(package_dir()))] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return stats


def key(digest: str | None = None) -> str:
    """What a warm process's imports depend on; a different key means a different warm process."""
    h = hashlib.sha256()
    h.update(f"{sys.executable}\0{sys.version}\0{package_dir()}\0{digest or code_digest()}\0".encode())
    for entry in sys.path:  # a pip install / uninstall changes a site-packages folder's mtime
        if entry.endswith("-packages") and os.path.isdir(entry):
            h.update(f"{entry}\0{os.stat(entry).st_mtime_ns}\0".encode())
    for name in sorted(os.environ):
        if name.startswith(KEY_ENV_PREFIXES) and name not in (WORKER_ENV, RUSAGE_ENV):
            h.update(f"{name}={os.environ[name]}\0".encode())
    return h.hexdigest()[:20]


def socket_dir() -> Path:
    """A per-user folder only its owner can enter (the socket runs code as that user)."""
    d = Path(os.environ.get(DIR_ENV) or Path(tempfile.gettempdir()) / f"rlhf-warm-{os.getuid()}")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"{d}: not a private folder of this user")
    return d


# ---- the stage's side ----------------------------------------------------------------------------------------


def delegate(argv: list[str]) -> int | None:
    """Run this stage script (argv[0]) in a worker of the warm process; its exit code, or None to run it here."""
    if os.environ.get(WORKER_ENV) or "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    try:
        conn = _connect_or_start(code_digest())
    except (OSError, TimeoutError, RuntimeError) as err:
        print(f"warm start unavailable ({err}); running in this process", file=sys.stderr)
        return None
    with conn:
        request = {"argv": argv, "cwd": os.getcwd(), "env": {**os.environ, WORKER_ENV: "1"},
                   "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
        try:  # nothing has run yet: any failure here still falls back to a direct run
            socket.send_fds(conn, [json.dumps(request).encode()], _stdio())
            reply = conn.recv(MAX_MSG)
        except OSError as err:
            reply, why = b"", str(err)
        else:
            why = "the warm process closed the connection"
        if not reply:
            print(f"warm start: {why}; running in this process", file=sys.stderr)
            return None
        pid = json.loads(reply)["pid"]
        previous = {s: signal.signal(s, lambda sig, _f: _forward(pid, sig))
                    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            done = json.loads(conn.recv(MAX_MSG) or b"{}")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if not done:
        print("warm start: lost the warm process while the stage ran", file=sys.stderr)
        return 1
    if os.environ.get(RUSAGE_ENV):
        Path(os.environ[RUSAGE_ENV]).write_text(json.dumps(done))
    status = done["status"]
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _stdio() -> list[int]:
    """fds 0-2 to hand to the worker; a closed one is replaced by /dev/null, as a fresh process would not have it."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def _connect_or_start(digest: str) -> socket.socket:
    """A connection to the warm process of this code (digest: the package as this command hashed it)."""
    k = key(digest)
    d = socket_dir()
    path = d / f"{k}.sock"
    try:
        return _connect(path)
    except OSError:
        pass
    with open(d / f"{k}.lock", "w") as lock:  # one starter per key; the others wait here, then connect
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _connect(path)
        except OSError:
            path.unlink(missing_ok=True)  # a warm process that was killed leaves its socket file behind
        log = open(d / f"{k}.log", "ab")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_dir().parent), os.environ.get("PYTHONPATH", "")]),
               NVML_CHECK_ENV: "1"}
        env.pop(RUSAGE_ENV, None)
        idle = os.environ.get(IDLE_ENV, "300")
        proc = subprocess.Popen([sys.executable, "-m", "rlhf.runtime.warm_start", str(path), idle, digest],
                                cwd=package_dir().parent, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() == CODE_CHANGED_EXIT:
                raise RuntimeError("the rlhf package changed while the warm process was starting")
            if proc.poll() is not None:
                raise RuntimeError(f"the warm process exited with {proc.returncode}; see {d / f'{k}.log'}")
            try:
                return _connect(path)
            except OSError:
                time.sleep(0.02)
        proc.kill()
        raise TimeoutError(f"the warm process was not ready after {READY_TIMEOUT_S} s")


# ---- the warm process ----------------------------------------------------------------------------------------------


def serve(path: Path, idle_s: float, digest: str) -> None:
    """Import everything, then fork a worker per connection until idle for idle_s seconds. Serves only if the package
    it imported is the one the starting command hashed (digest): unchanged from before the imports to after them,
    and with those contents. Otherwise it exits with CODE_CHANGED_EXIT (the command then runs the stage itself)."""
    import importlib

    before = code_stats()
    if code_digest() != digest:  # changed since the command hashed it
        sys.exit(CODE_CHANGED_EXIT)
    for name in PRELOAD:
        importlib.import_module(name)
    if code_stats() != before:  # an edit while importing, even one reverted since, may have been half loaded
        sys.exit(CODE_CHANGED_EXIT)
    foreign = [name for name, module in list(sys.modules.items()) if name.split(".")[0] == "rlhf"
               and getattr(module, "__file__", None) and package_dir() not in Path(module.__file__).resolve().parents]
    if foreign:
        raise RuntimeError(f"imported rlhf modules from outside {package_dir()}: {foreign}")
    if sys.modules["torch"].cuda.is_initialized():  # every forked stage would fail at its first CUDA call
        raise RuntimeError("CUDA was initialised while importing; a forked worker could not use the GPU")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))  # only now can a client connect: the imports are done
    listener.listen(16)
    (path.with_suffix(".pid")).write_text(str(os.getpid()))
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the per-connection supervisors are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener.settimeout(idle_s)
    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                break
            if os.fork() == 0:
                listener.close()
                _supervise(conn)  # never returns
            conn.close()
    finally:
        _remove_own(path)
        listener.close()


def _remove_own(path: Path) -> None:
    pid_file = path.with_suffix(".pid")
    try:
        if pid_file.read_text().strip() == str(os.getpid()):
            path.unlink(missing_ok=True)
            pid_file.unlink(missing_ok=True)
    except OSError:
        pass


def _supervise(conn: socket.socket) -> None:
    """Fork the worker, tell the client its pid, wait for it (killing it if the client goes away), report."""
    code = 0
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # so that wait4 below sees the worker
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_MSG, 3)
        request = json.loads(msg)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _work(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"pid": pid}).encode())
        status, usage = _wait(pid, conn)
        conn.send(json.dumps({"status": status, "maxrss_kib": usage.ru_maxrss, "utime_s": usage.ru_utime,
                              "stime_s": usage.ru_stime}).encode())
    except ConnectionAbortedError:
        code = 1
    except BaseException:  # noqa: BLE001 - a supervisor must always end with os._exit
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _wait(pid: int, conn: socket.socket):
    """Wait for the worker; if the client's connection closes first (it was killed), kill the worker."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll instead
        pidfd = None
    try:
        while True:
            ready, _, _ = select.select([conn] + ([pidfd] if pidfd is not None else []), [], [],
                                        None if pidfd is not None else 0.05)
            if conn in ready and not conn.recv(16):  # the stage must not outlive the command that asked for it
                os.kill(pid, signal.SIGKILL)
                os.wait4(pid, 0)
                raise ConnectionAbortedError("client gone; worker killed")
            if pidfd in ready or pidfd is None:
                done, status, usage = os.wait4(pid, 0 if pidfd is not None else os.WNOHANG)
                if done:
                    return status, usage
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _work(request: dict, fds: list[int]) -> None:
    """Become the client's process: its stdio, directory, environment and argv; run its stage script; exit."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.chdir(request["cwd"])
        if request.get("cpus"):  # the command's CPUs, not the warm process's: its thread count follows from them
            try:
                os.sched_setaffinity(0, request["cpus"])
            except OSError:
                pass  # CPUs this worker may not use: it keeps the warm process's, which its metrics then show
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = list(request["argv"])
        tty = os.isatty(1)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1 if tty else -1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        import runpy

        try:
            runpy.run_path(sys.argv[0], run_name="__main__")  # the script calls run_stage, which exits
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


# ---- `rlhf warm status|stop` ---------------------------------------------------------------------------------------


def running() -> list[tuple[int, Path]]:
    """(pid, socket) of this user's live warm processes."""
    found = []
    for pid_file in socket_dir().glob("*.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"rlhf.runtime.warm_start" in cmdline:
            found.append((pid, pid_file.with_suffix(".sock")))
    return found


def stop_all() -> int:
    procs = running()
    for pid, _ in procs:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while procs and time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid, _ in procs):
        time.sleep(0.05)
    return len(procs)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    serve(Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
