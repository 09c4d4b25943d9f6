import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).parent)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RLHF_WARM_IDLE", "60")  # warm processes started by tests do not linger
CONFIGS = ROOT / "models" / "configs"  # the real Qwen3 / Skywork configs and the Qwen3 tokenizer
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}


@pytest.fixture(scope="session", autouse=True)
def _private_warm_processes(tmp_path_factory):
    """The suite's warm processes live in a socket folder of its own (RLHF_WARM_DIR), so stopping them at the end
    leaves a user's own warm process, serving a `dvc repro` elsewhere, alone."""
    from rlhf.runtime import warm_start

    os.environ[warm_start.DIR_ENV] = str(tmp_path_factory.mktemp("warm"))
    yield
    warm_start.stop_all()
    os.environ.pop(warm_start.DIR_ENV, None)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-tensor tests: one thread is as fast, and on a busy machine two spinning OpenMP threads are
    20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stage(name: str, *args: str) -> list[str]:
    """The command line of a stage script, runnable from any project folder."""
    return [sys.executable, str(ROOT / "stages" / f"{name}.py"), *args]


def stage_main(name: str):
    """A stage script's `main(params, *args)`, to call in this process (not run as __main__: no run_stage)."""
    import runpy

    return runpy.run_path(str(ROOT / "stages" / f"{name}.py"))["main"]


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    from rlhf.models.architectures import build_policy

    return build_policy(CONFIGS, tmp_path_factory.mktemp("tiny") / "policy", **TINY)


@pytest.fixture(scope="session")
def tiny_reward(tmp_path_factory) -> Path:
    from rlhf.models.architectures import build_reward

    return build_reward(CONFIGS, tmp_path_factory.mktemp("tiny") / "reward", **TINY)


def full_params(**sections) -> dict:
    """The project's params.yaml (complete, as every params file must be) with some sections' keys replaced."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in sections.items():
        p[key].update(value)
    return p


def tiny_params(policy: Path, reward: Path, **sections) -> dict:
    """params.yaml for fast tests: shrunken Qwen3 policy/critic + Qwen3 sequence-classifier reward."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["policy_model"].update({"id": str(policy), "dtype": "float32"})
    p["reward_model"].update({"id": str(reward), "kind": "classifier"})
    p["data"].update({"eval_size": 4, "max_prompt_tokens": 200, "overlong": "truncate"})
    p["lora"].update({"r": 4, "alpha": 8})
    p["critic"].update({"lora_r": 4, "lora_alpha": 8})
    p["rollout"].update({"batch_size": 4, "max_new_tokens": 5, "micro_batch_size": 2})
    p["ppo"].update({"epochs": 2, "num_minibatches": 2})
    p["eval"].update({"max_new_tokens": 5})
    for key, value in sections.items():
        p[key].update(value)
    return p


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def make_project(dest: Path, params: dict, source_rows: int = 60) -> Path:
    """A fresh git + DVC repo with this project's dvc.yaml, the given params and a slice of the real data."""
    import pandas as pd

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "dvc.yaml", dest / "dvc.yaml")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for code in ("stages", "rlhf"):  # dvc.yaml's code deps, and the code its stages run
        shutil.copytree(ROOT / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / ".dvcignore", dest / ".dvcignore")
    data = dest / "data" / "tldr"
    data.mkdir(parents=True)
    df = pd.read_parquet(ROOT / "data" / "tldr" / "validation-1945.parquet").head(source_rows)
    df.to_parquet(data / "validation-1945.parquet")
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.com"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.autostage", "true"], dest)
    (dest / ".gitignore").write_text("__pycache__/\n")
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project"], dest)
    return dest


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory, tiny_policy, tiny_reward) -> Path:
    """A tiny project after `rlhf train --iterations 1 --commit`; tests copy it instead of training again."""
    repo = make_project(tmp_path_factory.mktemp("trained") / "repo", tiny_params(tiny_policy, tiny_reward))
    run(["rlhf", "train", "--iterations", "1", "--commit"], repo)
    return repo


def copy_repo(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def numerics(metrics: dict) -> dict:
    """A stage's numeric setting (the `numerics/*` entries of its metrics), less how it was served."""
    return {k: v for k, v in metrics.items() if k.startswith("numerics/") and k != "numerics/process"}


def sharded_project(folder: Path, policy: Path, reward: Path) -> Path:
    """A tiny project up to this iteration's batch, sized for 2 ranks: one thread per process, as torchrun gives each
    worker (BLAS results may depend on the thread count, a property of the kernels, not of how the work is sharded);
    2 micro-batches per minibatch and 2 generation chunks, so each rank holds one of each and even the update's
    gradient sums add the same two terms as one process does."""
    p = tiny_params(policy, reward, rollout={"batch_size": 8, "micro_batch_size": 2, "generation_chunk": 4},
                    ppo={"epochs": 2, "num_minibatches": 2}, runtime={"threads": 1})
    (folder / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (folder / "data").mkdir()
    shutil.copytree(ROOT / "data/tldr", folder / "data/tldr")
    for cmd in (stage("base_model", "policy"), stage("base_model", "reward"), stage("prepare"),
                ["rlhf", "init", "--no-baseline", "--no-track"], stage("sample")):
        run(cmd, folder)
    return folder


def cli_without_torch(*argv: str) -> str:
    """`rlhf ARGV…` run in a fresh interpreter; its output, which ends with whether torch got imported (commands that
    only read stored runs must not load it: seconds to import, and absent where runs are only read)."""
    code = ("import sys\nfrom rlhf.cli import app\n"
            f"sys.argv = ['rlhf', *{list(argv)!r}]\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout
