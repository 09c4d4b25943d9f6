"""bench/gpu_run.sh without a GPU: the params it writes pass validation in every mode (a GPU session must not
find out there), its table renders our side and TRL's, more ranks than GPUs is refused, and (slow) the CPU rehearsal
of the one command: an environment holding none of the packages the GPU image lacks (they come from the carried
cp311 wheels), a PYTHONPATH set beforehand, no package index, results under $OUT even when the run is killed."""

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.config.params import parse_params

ROOT = Path(__file__).resolve().parent.parent


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def args(device="cuda", tiny=False):
    return argparse.Namespace(device=device, tiny=tiny)


@pytest.mark.parametrize("device,tiny,quick", [("cuda", False, False), ("cuda", False, True), ("cpu", True, True),
                                               ("cpu", True, False)])
def test_preset_params_are_valid_in_every_mode(tmp_path, device, tiny, quick):
    params = parse_params(gpu_check().preset_params(tmp_path, args(device, tiny), quick))
    r = params.rollout
    assert r.batch_size == (8 if quick else 64)
    assert r.batch_size % (r.micro_batch_size * params.ppo.num_minibatches) == 0
    assert r.generation_chunk <= r.batch_size
    assert params.ppo.epochs == (1 if quick else 4)
    assert params.policy_model.dtype == "bfloat16" and params.runtime.device == device


def test_the_parts_end_within_the_total_however_long_each_takes():
    """Every part running to its deadline, on a machine with 2 GPUs (part d too): the parts still end within TOTAL,
    which leaves a 10-minute command a minute for the installs; on one GPU, parts a, b and c all get their own."""
    check = gpu_check()
    left, used, started = check.TOTAL, 0.0, []
    for key in "abcd":
        allowed = check.part_seconds(check.PARTS[key], left)
        if allowed is not None:
            started.append(key)
            used, left = used + allowed, left - allowed
    assert used <= check.TOTAL <= 540 and started[:3] == ["a", "b", "c"]
    assert sum(check.PARTS[k] for k in "abc") <= check.TOTAL
    assert check.part_seconds(120, check.MIN_PART - 1) is None and check.part_seconds(120, 50) == 50


class FakeRun:
    """Runs no stage: `stage` stands in for what the rollout command leaves behind."""

    def __init__(self, stage):
        self.stage, self.lines = stage, []

    def sh(self, cmd, cwd, extra_env):
        warm_dir = Path(extra_env["RLHF_WARM_DIR"])
        self.stage(warm_dir, Path(extra_env.get("RLHF_WARM_RUSAGE", warm_dir / "usage-not-asked-for.json")))

    def say(self, line):
        self.lines.append(line)


def refused(warm_dir, usage):  # the warm process started (its log exists), refused to serve; the stage ran directly
    (warm_dir / "key.log").write_text("RuntimeError: CUDA was initialised while importing")


def served(warm_dir, usage):
    (warm_dir / "key.log").write_text("")
    usage.write_text("{}")


@pytest.mark.parametrize("stage,expected", [(refused, False), (served, True)])
def test_the_warm_start_check_knows_whether_the_warm_process_served(tmp_path, stage, expected):
    (tmp_path / "data/iteration").mkdir(parents=True)
    (tmp_path / "data/iteration/rollout.parquet").write_bytes(b"same bytes either way")
    (tmp_path / "params.yaml").write_text("runtime: {warm_start: false}\n")
    row = gpu_check().warm_rollout(FakeRun(stage), tmp_path)
    assert row["identical_rollout"] and row["served_by_warm_process"] is expected


HARNESS = """
import argparse, importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("gpu_check", sys.argv[1])
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)
run = check.Run(Path(sys.argv[2]), argparse.Namespace(device="cpu", tiny=True))
run.stop_with_signals()
run.sh([sys.executable, "-c", "import time; time.sleep(120)", sys.argv[3]], Path(sys.argv[2]))
"""


def processes_with(marker: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_check_stopped_from_outside_takes_its_stage_down(tmp_path, sig):
    marker = f"stage-of-a-stopped-check-{sig.name}-{os.getpid()}"
    check = subprocess.Popen([sys.executable, "-c", HARNESS, str(ROOT / "bench/gpu_check.py"), str(tmp_path), marker])
    deadline = time.monotonic() + 60
    stage: list[int] = []
    while not stage and time.monotonic() < deadline:  # the check's own command line holds the marker too
        time.sleep(0.1)
        stage = [p for p in processes_with(marker) if p != check.pid]
    assert stage, "the stage never started"
    check.send_signal(sig)
    check.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(p in processes_with(marker) for p in stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in stage if p in processes_with(marker)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"the stage outlived the check stopped by {sig.name}"


def test_table_shows_both_sides_and_a_failed_trl_run():
    stage = {"wall_s": 10.0, "peak_allocated_gib": 3.0, "peak_reserved_gib": 4.0, "gpu": "GPU"}
    part = {"stages": {"rollout": stage, "update": stage}, "iteration_s": 20.0, "steps": 8, "generate_s": 5.0,
            "peak_reserved_gib": 4.0, "decode": {"tokens_per_s": 900.0, "samples_per_s": 17.0}}
    result = {"device": "cuda", "gpu": "GPU", "parts": {
        "b": part, "c": {"wall_s": 40.0, "generate_s": 8.0, "peak_gpu_reserved_gib": 6.0, "trl_version": "1.12.0",
                         "forward_batch": 64}}}
    text = gpu_check().table(result)
    assert "| rollout | 10.0 | 3.00 | 4.00 |" in text
    assert "| wall s, one iteration (process start-up and model loading included) | 20.0 | 40.0 |" in text
    assert "| peak GPU GiB reserved (ours: the largest stage) | 4.00 | 6.00 |" in text
    assert "ours/TRL: wall 0.50×" in text and "decode after a warm-up: 900.0 tokens/s" in text
    result["parts"]["c"] = {"error": "bench/trl_ppo_anchor.py exited with 1\nTraceback"}
    assert "TRL: failed (bench/trl_ppo_anchor.py exited with 1)" in gpu_check().table(result)


# ---- the CPU rehearsal of bench/gpu_run.sh ----------------------------------------------------------------------------

# What the GPU image lacks: the rehearsal's environment leaves these out, so they must come from the carried wheels.
ABSENT = ("dvc", "pydantic", "annotated_types", "typing_inspection", "datasets", "trl", "dill", "multiprocess",
          "_multiprocess", "nltk", "rouge_score", "ruamel", "rlhf", "__editable__")
MARK = "import os\nopen(os.path.join(os.environ['REHEARSAL_MARKS'], str(os.getpid())), 'w').close()\n"


@pytest.fixture(scope="session")
def wheels():
    """bench/gpu_wheels.sh's cp311 folder (made here once when missing: the package index is reachable on CI)."""
    folder = ROOT / "bench" / ".wheels" / "cp311"
    if not any(folder.glob("trl-*.whl")):
        subprocess.run(["bash", str(ROOT / "bench" / "gpu_wheels.sh"), "3.11"], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    return folder


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory, wheels):
    """A venv whose packages are this one's minus ABSENT (linked, not installed: no download), plus a PYTHONPATH
    folder whose sitecustomize marks every Python process that keeps it. The links sit in the venv's own
    site-packages, as the GPU image's packages sit in its prefix: dill (datasets' fingerprint, in TRL's part) pickles
    a module found outside sys.prefix by value, and pyarrow's cannot be pickled."""
    root = tmp_path_factory.mktemp("bare")
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    site = next((root / "venv" / "lib").glob("python3.*")) / "site-packages"
    source = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir())
    for entry in source.iterdir():
        name = entry.name.lower().replace("-", "_")
        if not name.startswith(ABSENT) and not name.endswith(".pth") and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    pythonpath = root / "pythonpath"
    pythonpath.mkdir()
    (pythonpath / "sitecustomize.py").write_text(MARK)
    return root / "venv" / "bin" / "python", pythonpath


def rehearsal(bare_python, tmp_path, *extra):
    python, pythonpath = bare_python
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update(PYTHON=str(python), PYTHONPATH=str(pythonpath), REHEARSAL_MARKS=str(marks), OUT=str(tmp_path / "out"),
               PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_CONFIG_FILE=os.devnull,
               RLHF_GPU_SITE=str(tmp_path / "site"), PATH=str(python.parent) + os.pathsep + os.environ["PATH"])
    for module in ("pydantic", "dvc", "trl", "datasets"):  # the environment really lacks them
        probe = subprocess.run([str(python), "-c", f"import {module}"], env={**env, "PYTHONPATH": ""},
                               capture_output=True)
        assert probe.returncode != 0, f"{module} is importable without the carried wheels"
    cmd = ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--device", "cpu", "--tiny", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True), tmp_path / "out", marks


@pytest.mark.slow
def test_cpu_rehearsal_of_the_gpu_command(bare_python, tmp_path):
    # the GPU's deadlines are sized for a GPU; a 2-core CPU gets more time for the same tiny work
    proc, out, marks = rehearsal(bare_python, tmp_path, *[f"--deadline={p}=900" for p in "abc"], "--total=3000")
    output = proc.communicate(timeout=1800)[0]
    stages_log = (out / "stages.log").read_text(errors="replace") if (out / "stages.log").exists() else ""
    assert proc.returncode == 0, output[-3000:] + "\nstages.log:\n" + stages_log[-4000:]
    result = json.loads((out / "gpu.json").read_text())
    assert [k for k, v in result["parts"].items() if v["status"] == "ok"] == ["a", "b", "c"], output[-3000:]
    a, b, c = (result["parts"][k] for k in "abc")
    assert list(a["stages"]) == ["sample", "rollout", "reward", "reference", "advantages", "update"]
    assert a["first_minibatch_ratio_max_abs_dev"] == 0.0 and b["first_minibatch_ratio_max_abs_dev"] == 0.0
    assert a["warm_start"]["identical_rollout"] and a["warm_start"]["served_by_warm_process"]
    assert b["steps"] == 8 and b["decode"]["tokens_per_s"] > 0 and c["trl_version"] == "1.12.0"
    log = (out / "gpu-run.log").read_text()
    assert "installed 10 carried wheels (cp311)" in log and "b update:" in log and "part c ok" in log
    assert len(list(marks.iterdir())) >= 20  # every stage's process kept the PYTHONPATH it was given


@pytest.mark.slow
def test_a_killed_rehearsal_leaves_the_parts_that_completed(bare_python, tmp_path):
    """Part b passes its deadline (killed, recorded), then the whole command is killed as a device run at its
    time limit is: what had completed is under $OUT."""
    proc, out, _ = rehearsal(bare_python, tmp_path, "--parts", "abc", "--deadline", "a=900", "--deadline", "b=20",
                             "--total", "3000")
    try:
        deadline = time.monotonic() + 1500
        while "b" not in json.loads((out / "gpu.json").read_text() if (out / "gpu.json").exists() else "{}").get(
                "parts", {}):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = json.loads((out / "gpu.json").read_text())
    assert result["parts"]["a"]["status"] == "ok" and result["parts"]["b"]["status"] == "timeout"
    assert "killed at the part's deadline" in result["parts"]["b"]["error"]
    log = (out / "gpu-run.log").read_text()
    assert "part a ok" in log and "part b timeout" in log and (out / "stages.log").stat().st_size > 0
