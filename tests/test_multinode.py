"""Two nodes on one host: the launcher line of docs/cluster.md, with a stand-in `srun` that starts it once per node.

Each "node" is one torchrun agent with one process; they meet at a c10d rendezvous on localhost (gloo, CPU). The
rollout, reference and update stages write, byte for byte, what one process writes, and only global rank 0 writes:
the second node runs in a copy of the project that holds the same inputs, and nothing appears there. A node killed
mid-stage fails the stage with one `error:` line naming the rendezvous endpoint, leaves nothing half-written, and
the next `dvc repro` of the stage completes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, make_project, run, sharded_project, stage, tiny_params

SRUN = '''#!{python}
"""Stand-in for `srun --ntasks-per-node=1 CMD` on one host: CMD once per node ($SLURM_NNODES), all at once, each in
a session of its own (a node to kill); node i runs in the i-th folder of $NODE_DIRS when set. Like srun without
--kill-on-bad-exit, it waits for every node and exits with the worst exit status."""
import os, subprocess, sys

argv = sys.argv[1:]
while argv and argv[0].startswith("-"):
    argv.pop(0)  # srun's own options, all written --name=value
nodes = int(os.environ["SLURM_NNODES"])
dirs = os.environ["NODE_DIRS"].split(os.pathsep) if os.environ.get("NODE_DIRS") else [os.getcwd()] * nodes
procs = [subprocess.Popen(argv, cwd=dirs[i], start_new_session=True,
                          env={{**os.environ, "SLURM_NODEID": str(i), "SLURM_PROCID": str(i)}})
         for i in range(nodes)]
if os.environ.get("NODE_PIDS"):
    with open(os.environ["NODE_PIDS"], "w") as f:
        f.write(" ".join(str(p.pid) for p in procs))
codes = [p.wait() for p in procs]
for i, code in enumerate(codes):
    if code:
        print(f"srun: node{{i}}: task {{i}}: exited with status {{code}}", file=sys.stderr)
sys.exit(max((c if c >= 0 else 128 - c) for c in codes))
'''


def recipe_launcher() -> str:
    """The `launcher:` line of docs/cluster.md's params block: what a cluster user copies, run here unchanged."""
    found = re.findall(r"^\s*launcher: (srun .+)$", (ROOT / "docs/cluster.md").read_text(), re.M)
    assert len(found) == 1, "docs/cluster.md should show exactly one multi-node launcher line"
    return found[0].strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    """PATH with the stand-in srun, and the variables a SLURM job script sets (docs/cluster.md): two nodes of one
    process each, the first node's host name, a free port, a job id."""
    bindir = tmp_path_factory.mktemp("bin")
    srun = bindir / "srun"
    srun.write_text(SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    return {"PATH": os.pathsep.join([str(bindir), BIN, os.environ["PATH"]]), "PYTHONPATH": str(ROOT),
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "HEAD_NODE": "localhost"}


def launch(cwd: Path, cluster: dict, script: str, **env: str) -> subprocess.Popen:
    """`${runtime.launcher} stages/<script>.py` through a shell, as `dvc repro` runs it."""
    env = {**os.environ, **cluster, "RDZV_PORT": str(free_port()), "SLURM_JOB_ID": f"test-{time.time_ns()}", **env}
    return subprocess.Popen(f"{recipe_launcher()} {ROOT / 'stages' / script}.py", shell=True, cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the stage hung for {timeout:.0f} s:\n{err[-3000:]}")
    return proc.returncode, out + err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_policy, tiny_reward):
    return sharded_project(tmp_path_factory.mktemp("nodes"), tiny_policy, tiny_reward)


OUTPUTS = {"rollout": ["data/iteration/rollout.parquet", "metrics/rollout.json"],
           "reference": ["data/iteration/reference.parquet"],
           "update": ["models/next", "metrics/update.json", "metrics/train"]}


def tree_bytes(path: Path) -> dict:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


@pytest.mark.slow  # four to eight torch start-ups per stage: minutes on a 2-core machine
def test_two_nodes_write_what_one_process_writes(workdir, cluster, tmp_path):

    for name in ("rollout", "reference", "update"):
        if name == "update":
            run(stage("reward"), workdir)
            run(stage("advantages"), workdir)
        run(stage(name), workdir)
        single = {out: tree_bytes(workdir / out) for out in OUTPUTS[name]}
        for out in OUTPUTS[name]:
            shutil.rmtree(workdir / out) if (workdir / out).is_dir() else (workdir / out).unlink()
        # The second node sees the same inputs in a folder of its own: whatever it writes shows up there.
        node1 = tmp_path / name
        shutil.copytree(workdir, node1, symlinks=True)
        code, output = finish(launch(workdir, cluster, name, NODE_DIRS=os.pathsep.join([str(workdir), str(node1)])))
        assert code == 0, output[-3000:]
        for out in OUTPUTS[name]:
            assert not (node1 / out).exists(), f"{name}: the second node wrote {out}"
            two = tree_bytes(workdir / out)
            if out == "metrics/update.json":  # its wall time and numeric setting (torchrun sets 1 thread) aside
                one, two = ({k: v for k, v in yaml.safe_load(x[""]).items() if not k.startswith("numerics/")}
                            for x in (single[out], two))
                one.pop("update_seconds"), two.pop("update_seconds")
                assert one == two, f"{name}: {out} differs between one process and two nodes"
            elif out == "metrics/rollout.json":
                keep = ("iteration", "response_length_mean", "eos_rate", "compute_dtype")
                one, two = (yaml.safe_load(x[""]) for x in (single[out], two))
                assert {k: one[k] for k in keep} == {k: two[k] for k in keep}
            else:
                assert two == single[out], f"{name}: {out} differs between one process and two nodes"
        line = f"{name}: stage took"
        assert output.count(line) == 1, f"{name}: the stage's lines should come once, from global rank 0:\n{output}"


def kill_node(agent: int) -> None:
    """SIGKILL a node's agent and every process under it, as a node that dies (torchrun starts its workers in
    sessions of their own, so a process group is not enough)."""
    pids, todo = [], [agent]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Watched:
    """A command whose merged output is read as it comes, to act on a line before the command ends."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, needle: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, f"no {needle!r}:\n{self.text()[-3000:]}"
            time.sleep(0.05)

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the stage hung for {timeout:.0f} s:\n{self.text()[-3000:]}")
        self.reader.join()
        return self.proc.returncode, self.text()


@pytest.mark.slow  # four to eight torch start-ups per stage: minutes on a 2-core machine
def test_node_killed_mid_stage_fails_in_one_line_then_repro_completes(tmp_path, cluster, tiny_policy, tiny_reward):
    # Progress bars on: the first "generate" bar says the ranks have met and are generating (a few seconds of it:
    # 48 tokens for 8 prompts), the moment to take a node away.
    p = tiny_params(tiny_policy, tiny_reward, rollout={"batch_size": 8, "max_new_tokens": 48, "generation_chunk": 4},
                    runtime={"launcher": recipe_launcher(), "peer_timeout": 20, "warm_start": False, "threads": 1,
                             "progress": "on"})
    repo = make_project(tmp_path / "repo", p)
    env = {**os.environ, **cluster, "RDZV_PORT": str(free_port()), "SLURM_JOB_ID": "test-kill",
           "NODE_PIDS": str(tmp_path / "pids")}
    code, output = Watched(["dvc", "repro", "prepare", "reward_model"], repo, env).finish()
    assert code == 0, output[-3000:]
    run(["rlhf", "init", "--no-baseline"], repo)

    repro = Watched(["dvc", "repro", "rollout"], repo, env)
    repro.wait_for("generate")
    kill_node(int((tmp_path / "pids").read_text().split()[1]))
    code, output = repro.finish()

    assert code != 0
    # A bar cut short leaves no line end: the error line may begin right after it.
    errors = re.findall(r"error: [^\r\n]*", output)
    assert len(errors) == 1, f"one error line expected:\n{output[-4000:]}"
    assert f"localhost:{env['RDZV_PORT']}" in errors[0], errors[0]
    assert "Traceback" not in output, output[-4000:]
    iteration = repo / "data/iteration"
    assert not (iteration / "rollout.parquet").exists()
    assert not [f.name for f in iteration.iterdir() if f.name.startswith(".")], "a temporary file was left behind"
    assert not (repo / "metrics/rollout.json").exists()

    code, output = Watched(["dvc", "repro", "rollout"], repo, env).finish()
    assert code == 0, output[-3000:]
    assert (iteration / "rollout.parquet").exists()
    status = subprocess.run(["dvc", "status", "rollout"], cwd=repo, env=env, text=True, capture_output=True)
    assert "up to date" in status.stdout, status.stdout


def test_report_says_how_many_ranks_the_work_keeps_busy(tiny_policy, tiny_reward):
    from rlhf.config.params import parse_params
    from rlhf.reports.memory import rank_split

    p = parse_params(tiny_params(tiny_policy, tiny_reward, rollout={"batch_size": 64, "micro_batch_size": 4,
                                                                    "generation_chunk": 16},
                                 ppo={"num_minibatches": 4}))
    text = rank_split(p)
    assert "4 generation chunks of 16 prompts" in text
    assert "16 micro-batches of 4" in text
    assert "4 micro-batches per update step" in text and "at most 4 ranks busy" in text


def test_a_node_alone_at_the_rendezvous_fails_in_one_line_at_the_join_timeout(tmp_path):
    """The other node never comes: the agent gives up after join_timeout with one line naming the endpoint (plain
    torchrun prints a page of agent traceback without it)."""
    port = free_port()
    cmd = ["rlhf", "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "alone", "--rdzv-conf", "join_timeout=3",
           str(ROOT / "stages" / "rollout.py")]
    start = time.monotonic()
    result = run(cmd, tmp_path, check=False)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: rendezvous localhost:{port} (id alone, 2 nodes)"), lines
    assert "join_timeout=3 s" in lines[0]
    assert time.monotonic() - start < 120
