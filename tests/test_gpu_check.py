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
    assert r.batch_size == (8 if quick else 64 if tiny else 256)
    assert r.batch_size % (r.micro_batch_size * params.ppo.num_minibatches) == 0
    assert r.generation_chunk <= r.batch_size
    assert params.ppo.epochs == (1 if quick else 4)
    assert params.policy_model.dtype == "bfloat16" and params.runtime.device == device


def test_the_parts_end_within_the_total_however_long_each_takes():
    """Every part running to its deadline, on a machine with 2 GPUs (part d too): the parts still end CLEANUP seconds
    before TOTAL, which stays under 570 s with the preflight counted in it; on one GPU, parts a, b and w get their
    own deadlines whole and c what is left."""
    check = gpu_check()
    preflight = 30.0  # what the preflight's imports took on a slow machine
    left, used, started = check.TOTAL - check.CLEANUP - preflight, 0.0, []
    for key in check.ORDER:
        allowed = check.part_seconds(check.PARTS[key], left)
        if allowed is not None:
            started.append(key)
            used, left = used + allowed, left - allowed
    assert preflight + used + check.CLEANUP <= check.TOTAL <= 570 and started[:4] == ["a", "b", "w", "c"]
    assert sum(check.PARTS[k] for k in "abw") + check.MIN_PART <= check.TOTAL - check.CLEANUP - preflight
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


def test_table_shows_both_sides_and_a_failed_or_skipped_trl_run():
    stage = {"wall_s": 10.0, "start_s": 2.0, "load_s": 3.0, "compute_s": 5.0, "peak_allocated_gib": 3.0,
             "peak_reserved_gib": 4.0, "gpu": "GPU", "attention": ["sdpa"], "sdpa_backend": ["efficient"]}
    part = {"stages": {"rollout": stage, "update": stage}, "evaluate": stage, "iteration_s": 20.0, "start_s": 4.0,
            "load_s": 6.0, "compute_s": 10.0, "samples": 256, "prompt_tokens": 100000, "response_tokens": 13000,
            "samples_per_s": 25.6, "tokens_per_s": 11300.0, "steps": 8, "generate_s": 5.0, "peak_reserved_gib": 4.0,
            "decode": {"tokens_per_s": 900.0, "samples_per_s": 17.0, "prefill_tokens_per_s": 50000.0,
                       "decode_tokens_per_s": 950.0}}
    result = {"device": "cuda", "gpu": "GPU", "versions": {"torch": "2.11.0", "cuda": "13.0", "cudnn": 91000,
                                                           "driver": "580.1", "transformers": "5.17.0",
                                                           "peft": "0.18.0", "accelerate": "1.15.0"},
              "parts": {"b": part, "c": {"wall_s": 40.0, "generate_s": 8.0, "peak_gpu_reserved_gib": 6.0,
                                         "trl_version": "1.12.0", "forward_batch": 64, "checkpointing": False,
                                         "shape": {"micro_batch": 8}}}}
    text = gpu_check().table(result)
    assert "torch 2.11.0, CUDA 13.0, cuDNN 91000, driver 580.1, transformers 5.17.0, peft 0.18.0" in text
    assert "| rollout | 10.0 | 2.0 | 3.0 | 5.0 | 3.00 | 4.00 | sdpa (SDPA efficient) |" in text
    assert "| evaluate | 10.0 |" in text and "| **iteration** | **20.0** | 4.0 | 6.0 | **10.0** |" in text
    assert "256 samples, 113000 tokens: 25.60 samples/s, 11300 tokens/s of stage compute" in text
    assert "| wall s, one iteration (process start-up and model loading included) | 20.0 | 40.0 |" in text
    assert "| peak GPU GiB reserved (ours: the largest stage) | 4.00 | 6.00 |" in text
    assert "ours/TRL: wall 0.50×" in text and "decode after a warm-up: 900.0 tokens/s" in text
    assert "prefill 50000 prompt tokens/s, decode steps 950.0 tokens/s" in text
    result["parts"]["c"] = {"error": "bench/trl_ppo_anchor.py exited with 1\nTraceback"}
    assert "TRL: failed (bench/trl_ppo_anchor.py exited with 1)" in gpu_check().table(result)
    result["parts"]["c"] = {"status": "skipped", "reason": "TRL's process needs ~99.0 GiB"}
    assert "TRL: skipped (TRL's process needs ~99.0 GiB)" in gpu_check().table(result)


class Stages:
    """Stands in for run_stage: a row per stage, and the part's deadline passing at the stage named `killed_at`."""

    def __init__(self, check, killed_at):
        self.check, self.killed_at = check, killed_at

    def __call__(self, run, proj, name, nproc=1, extra_env=None):
        if name == self.killed_at:
            raise self.check.Deadline(f"{name}.py: killed at the part's deadline")
        return {"wall_s": 1.0, "start_s": 0.1, "load_s": 0.2, "compute_s": 0.7}


def test_each_stage_is_in_gpu_json_the_moment_it_ends(tmp_path, monkeypatch):
    """A part stopped at its deadline in its third stage: gpu.json already holds the two stages that ended."""
    check = gpu_check()
    monkeypatch.setattr(check, "run_stage", Stages(check, "reward"))
    run = check.Run(tmp_path / "out", argparse.Namespace(device="cpu", tiny=True))
    row = run.result["parts"]["b"] = {"status": "running"}
    with pytest.raises(check.Deadline):
        check.iteration(run, tmp_path, "b", row)
    saved = json.loads((tmp_path / "out" / "gpu.json").read_text())["parts"]["b"]
    assert list(saved["stages"]) == ["sample", "rollout"] and saved["stages"]["rollout"]["compute_s"] == 0.7


def found_on_a_gpu(**changes):
    """What the preflight's child reports on an H100 that nothing else uses (its own CUDA context: 0.5 GiB)."""
    found = {"versions": {"torch": "2.11.0", "cuda": "13.0", "cudnn": 91300, "driver": "580.95", "transformers": "5.17.0",
                          "peft": "0.18.1", "accelerate": "1.15.0"},
             "import_errors": {}, "gpus": 1, "gpu": "NVIDIA H100 80GB HBM3", "gpu_free_gib": 79.1,
             "gpu_total_gib": 79.6, "gpu_used_gib": 0.5, "trl_fit": {"fits": True}}
    return {**found, **changes}


@pytest.mark.parametrize("found,free_gb,says", [
    (found_on_a_gpu(), 60.0, None),
    (found_on_a_gpu(gpu_free_gib=49.6, gpu_used_gib=30.0), 60.0,
     "preflight: 30.0 GiB of the GPU's 79.6 GiB are in use before the check starts (another process holds it)"),
    (found_on_a_gpu(), 20.0, "preflight: 20.0 GB free under "),
    (found_on_a_gpu(import_errors={"trl": "ImportError: cannot import name 'X'"}), 60.0,
     "preflight: not importable: trl (ImportError: cannot import name 'X'); "),
    (found_on_a_gpu(gpus=0), 60.0, "preflight: --device cuda, but torch sees no CUDA device"),
])
def test_the_preflight_stops_an_unfit_machine_in_one_line(tmp_path, monkeypatch, found, free_gb, says):
    """The GPU's side of the preflight, with its child's report given: a GPU held by another process, too little
    disk for the models, a module that fails to import, no GPU at all: each one line, before anything heavy;
    otherwise the versions are in gpu.json before the first part starts."""
    check = gpu_check()
    monkeypatch.setattr(check, "missing_modules", lambda parts: [])
    monkeypatch.setattr(check.shutil, "disk_usage", lambda path: argparse.Namespace(free=free_gb * 1e9))
    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=json.dumps(found) + "\n", stderr=""))
    run = check.Run(tmp_path / "out", argparse.Namespace(device="cuda", tiny=False, trl_micro=None, trl_limit_gib=70))
    if says is None:
        check.preflight(run, "abwc", tmp_path)
        saved = json.loads((tmp_path / "out" / "gpu.json").read_text())
        assert saved["versions"]["cudnn"] == 91300 and saved["gpu"] == "NVIDIA H100 80GB HBM3"
        assert "preflight ok" in run_log(tmp_path) and "driver 580.95" in run_log(tmp_path)
    else:
        with pytest.raises(check.Stop) as err:
            check.preflight(run, "abwc", tmp_path)
        assert str(err.value).startswith(says) and "\n" not in str(err.value)


def run_log(tmp_path):
    return (tmp_path / "out" / "gpu-run.log").read_text()


def test_trl_is_sized_by_the_memory_model():
    """At part b's shape (256 prompts, micro-batch 8, chunk 64, 53 new tokens) TRL's process fits 70 GiB without
    checkpointing; a whole 32-row minibatch in one graph (TRL's earlier shape here) needs checkpointing; an
    oversize micro-batch fits with neither, and the part is then skipped."""
    from rlhf.reports.memory import RESERVE, count_policy, count_reward

    check = gpu_check()
    configs = ROOT / "models" / "configs"
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    counts = check.dataclasses.asdict(count_policy(configs, 32, 64, targets))
    reward = count_reward(configs)

    def plan(micro):
        return check.trl_plan(counts, reward, 256, micro, 64, 53, 512, check.TRL_LIMIT_GIB, RESERVE)

    eight, thirty_two, huge = plan(8), plan(32), plan(4096)
    assert eight["fits"] and not eight["checkpointing"] and eight["gib"] * RESERVE <= 70
    assert thirty_two["fits"] and thirty_two["checkpointing"] and thirty_two["tried"][0]["gib"] * RESERVE > 70
    assert not huge["fits"] and [t["checkpointing"] for t in huge["tried"]] == [False, True]


# ---- the CPU rehearsal of bench/gpu_run.sh ----------------------------------------------------------------------------

# What the GPU image lacks: the rehearsal's environment leaves these out, so they must come from the carried wheels.
ABSENT = ("dvc", "pydantic", "annotated_types", "typing_inspection", "datasets", "trl", "dill", "multiprocess",
          "_multiprocess", "nltk", "rouge_score", "ruamel", "rlhf", "__editable__")
# Where the image's versions differ from this venv's: left out, and the image's own installed instead (IMAGE_WHEELS).
REPLACED = ("transformers", "huggingface_hub", "httpx", "httpcore")
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
def image_wheels():
    """The GPU image's transformers and huggingface-hub (bench/gpu_wheels.sh image; made here once when missing)."""
    folder = ROOT / "bench" / ".image-wheels"
    if len(list(folder.glob("*.whl"))) < len(gpu_check().IMAGE_WHEELS):
        subprocess.run(["bash", str(ROOT / "bench" / "gpu_wheels.sh"), "image"], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    return folder


def linked_venv(root: Path, leave_out: tuple[str, ...], image_wheels: Path) -> Path:
    """A venv whose packages are this one's minus `leave_out` and REPLACED (linked, not installed: no download),
    plus the image's versions of REPLACED from their wheels. The links sit in the venv's own site-packages, as the
    GPU image's packages sit in its prefix: dill (datasets' fingerprint, in TRL's part) pickles a module found outside
    sys.prefix by value, and pyarrow's cannot be pickled."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    site = next((root / "venv" / "lib").glob("python3.*")) / "site-packages"
    source = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir())
    for entry in source.iterdir():
        name = entry.name.lower().replace("-", "_")
        if not name.startswith(leave_out + REPLACED) and not name.endswith(".pth") and not (site / entry.name).exists():
            (site / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
                    "--no-deps", "--no-compile", "--target", str(site), *map(str, sorted(image_wheels.glob("*.whl")))],
                   check=True)
    return root / "venv" / "bin" / "python"


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory, wheels, image_wheels):
    """The device-shaped venv: none of the packages the GPU image lacks (they come from the carried wheels), the
    image's transformers and huggingface-hub; plus a PYTHONPATH folder whose sitecustomize marks every Python
    process that keeps it."""
    root = tmp_path_factory.mktemp("bare")
    python = linked_venv(root, ABSENT, image_wheels)
    pythonpath = root / "pythonpath"
    pythonpath.mkdir()
    (pythonpath / "sitecustomize.py").write_text(MARK)
    return python, pythonpath


def rehearsal(bare_python, tmp_path, *extra, wheel_folder: Path | None = None):
    python, pythonpath = bare_python
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "RLHF_GPU_"))}
    env.update(PYTHON=str(python), PYTHONPATH=str(pythonpath), REHEARSAL_MARKS=str(marks), OUT=str(tmp_path / "out"),
               PIP_NO_INDEX="1", PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_CONFIG_FILE=os.devnull,
               RLHF_GPU_SITE=str(tmp_path / "site"), PATH=str(python.parent) + os.pathsep + os.environ["PATH"])
    if wheel_folder is not None:
        env["RLHF_GPU_WHEELS"] = str(wheel_folder)
    for module in ("pydantic", "dvc", "trl", "datasets"):  # the environment really lacks them
        probe = subprocess.run([str(python), "-c", f"import {module}"], env={**env, "PYTHONPATH": ""},
                               capture_output=True)
        assert probe.returncode != 0, f"{module} is importable without the carried wheels"
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             env={**env, "PYTHONPATH": ""}, capture_output=True, text=True).stdout.strip()
    assert version == "5.17.0", version  # the image's, not this venv's
    cmd = ["bash", str(ROOT / "bench" / "gpu_run.sh"), "--device", "cpu", "--tiny", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True), tmp_path / "out", marks


def test_missing_wheels_stop_at_the_preflight_within_seconds(bare_python, tmp_path):
    """No wheel folder carried: the preflight finds the modules missing before anything heavy (no model is built,
    no stage starts) and says in one line what the device call must carry."""
    start = time.monotonic()
    proc, out, _ = rehearsal(bare_python, tmp_path, wheel_folder=tmp_path / "not-carried")
    output = proc.communicate(timeout=120)[0]
    seconds = time.monotonic() - start
    assert proc.returncode == 2, output
    error = [line for line in output.splitlines() if "error:" in line]
    assert len(error) == 1 and 'carry: ["bench/.wheels"]' in error[0] and "pydantic" in error[0], output
    assert "not importable: " in error[0] and seconds < 30, (seconds, output)
    assert not (out / "stages.log").exists() or (out / "stages.log").stat().st_size == 0
    assert "error" in json.loads((out / "gpu.json").read_text())["preflight"]


@pytest.mark.slow
def test_an_oversize_trl_shape_skips_part_c_in_one_line(bare_python, tmp_path):
    """TRL's micro-batch faked far above what the GPU holds: the preflight's memory check skips part c, in one
    line, before TRL's process would start (the check itself succeeds)."""
    proc, out, _ = rehearsal(bare_python, tmp_path, "--parts", "c", "--trl-micro", "4096")
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-3000:]
    part = json.loads((out / "gpu.json").read_text())["parts"]["c"]
    assert part["status"] == "skipped" and "even with gradient checkpointing" in part["reason"]
    lines = [line for line in (out / "gpu-run.log").read_text().splitlines() if "part c" in line]
    assert len(lines) == 1 and lines[0].endswith(f"part c skipped: {part['reason']}"), lines
    assert "trl_ppo_anchor" not in ((out / "stages.log").read_text() if (out / "stages.log").exists() else "")


@pytest.mark.slow
def test_cpu_rehearsal_of_the_gpu_command(bare_python, tmp_path):
    # the GPU's deadlines are sized for a GPU; a 2-core CPU gets more time for the same tiny work
    proc, out, marks = rehearsal(bare_python, tmp_path, *[f"--deadline={p}=900" for p in "abwc"], "--total=3000")
    output = proc.communicate(timeout=1800)[0]
    stages_log = (out / "stages.log").read_text(errors="replace") if (out / "stages.log").exists() else ""
    assert proc.returncode == 0, output[-3000:] + "\nstages.log:\n" + stages_log[-4000:]
    result = json.loads((out / "gpu.json").read_text())
    assert [k for k, v in result["parts"].items() if v["status"] == "ok"] == ["a", "b", "w", "c"], output[-3000:]
    a, b, w, c = (result["parts"][k] for k in "abwc")
    v = result["versions"]
    assert v["transformers"] == "5.17.0" and v["huggingface_hub"] == "1.33.0" and v["torch"] and v["peft"]
    assert {"cuda", "cudnn", "driver", "accelerate"} <= set(v) and result["preflight"]["free_disk_gb"] > 0
    assert list(a["stages"]) == ["sample", "rollout", "reward", "reference", "advantages", "update"]
    for name in ("rollout", "reference", "update"):  # the CPU's attention: our chunked kernel, nothing pinned
        assert b["stages"][name]["attention"] == ["chunked"] and b["stages"][name]["sdpa_backend"] is None
    assert a["first_minibatch_ratio_max_abs_dev"] == 0.0 and b["first_minibatch_ratio_max_abs_dev"] == 0.0
    assert w["identical_rollout"] and w["served_by_warm_process"]
    assert b["steps"] == 8 and b["samples"] == 64 and b["samples_per_s"] > 0 and b["tokens_per_s"] > 0
    assert all(s["load_s"] > 0 for n, s in b["stages"].items() if n in ("rollout", "reward", "reference", "update"))
    assert b["compute_s"] < b["iteration_s"] and b["evaluate"]["load_s"] > 0
    d = b["decode"]
    assert d["prefill_s"] > 0 and d["decode_s"] > 0 and d["decode_tokens_per_s"] > 0
    assert c["trl_version"] == "1.12.0" and c["shape"]["prompts"] == 64 and c["shape"]["micro_batch"] == 8
    assert result["clock"]["total_s"] < 3000 and result["clock"]["cleanup_s"] >= 0
    log = (out / "gpu-run.log").read_text()
    assert "installed 10 carried wheels (cp311)" in log and "preflight ok" in log and "b evaluate:" in log
    assert "part c ok" in log and "part w ok" in log
    assert len(list(marks.iterdir())) >= 20  # every stage's process kept the PYTHONPATH it was given


@pytest.mark.slow
def test_a_killed_rehearsal_leaves_the_parts_that_completed(bare_python, tmp_path):
    """Part b passes its deadline (killed, recorded, with the stages it finished), then the whole command is killed
    as a device run at its time limit is: part a's numbers are in gpu.json, the warm start (part w) never ended."""
    proc, out, _ = rehearsal(bare_python, tmp_path, "--parts", "abwc", "--deadline", "a=900", "--deadline", "b=25",
                             "--total", "3000")
    try:
        deadline = time.monotonic() + 1500
        while json.loads((out / "gpu.json").read_text() if (out / "gpu.json").exists() else "{}").get(
                "parts", {}).get("b", {}).get("status", "running") == "running":
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    result = json.loads((out / "gpu.json").read_text())
    a, b = result["parts"]["a"], result["parts"]["b"]
    assert a["status"] == "ok" and len(a["stages"]) == 6 and a["samples_per_s"] > 0
    assert b["status"] == "timeout" and "killed at the part's deadline" in b["error"]
    assert "sample" in b["stages"] and result["parts"].get("w", {}).get("status", "running") == "running"
    log = (out / "gpu-run.log").read_text()
    assert "part a ok" in log and "part b timeout" in log and (out / "stages.log").stat().st_size > 0


# ---- the GPU image's transformers, on the tiny-model stage tests -------------------------------------------------------

IMAGE_TESTS = ["test_attention", "test_sampling", "test_models", "test_host_syncs", "test_passes", "test_stage_calls",
               "test_pipeline", "test_warm", "test_sft", "test_export_card", "test_internals"]


@pytest.mark.slow
def test_the_stage_tests_pass_on_the_images_transformers(tmp_path, image_wheels):
    """This venv with the GPU image's transformers and huggingface-hub in place of its own: the tiny-model stage
    tests pass there too (the project is tested at one transformers version otherwise)."""
    python = linked_venv(tmp_path, ("rlhf", "__editable__"), image_wheels)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), PATH=str(python.parent) + os.pathsep + os.environ["PATH"])
    version = subprocess.run([str(python), "-c", "import transformers, huggingface_hub as h; "
                              "print(transformers.__version__, h.__version__)"], env=env, capture_output=True,
                             text=True).stdout.split()
    assert version == ["5.17.0", "1.33.0"], version
    done = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow and not realsize",
                           *[f"tests/{t}.py" for t in IMAGE_TESTS]], cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"transformers 5.17.0: {done.stdout.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
