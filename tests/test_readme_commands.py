"""The README's commands, run as a user would type them, on a tiny project.

Every ```bash block of README.md runs, top to bottom, as one `bash -e` script in a git + DVC project built like a
fresh clone (this project's dvc.yaml, .dvc/config, .gitignore and a slice of the real data, with the tiny random
Qwen3 models of conftest in params.yaml and `.venv` linking the running environment). A block that starts from a
fresh clone (it runs `.ci/setup` or a plain `rlhf init`) gets a new project; every other block continues in the
project the previous block left. Two things differ from a user's machine, both stated here:
- `bash .ci/setup &&` is dropped: it installs packages, and the test already runs in an installed environment;
- right after `rlhf preset qwen3-skywork`, the test checks that params.yaml names Qwen3-0.6B, Skywork-Reward-V2 and
  trl-lib/tldr, then points those ids at tiny random stand-ins of the same architectures and the data at the local
  TL;DR slice (no hub here), and shrinks the sizes; the preset's other settings (bf16, classifier reward, chat
  prompt, no reference cache) stay.
```sh blocks (a GPU, torchrun, the test suite itself) and ```text/```yaml blocks are not run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BIN, ROOT, make_project, run, tiny_params

pytestmark = pytest.mark.slow

FAST = {"ppo": {"epochs": 1, "num_minibatches": 2}, "train": {"iterations": 1}}
SETUP = "bash .ci/setup && "


def readme_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def starts_fresh(block: str) -> bool:
    return ".ci/setup" in block or re.search(r"^\s*[^#]*rlhf init(?! --force)", block, flags=re.M) is not None


def stand_in_script(policy: Path, reward: Path) -> str:
    """Python source that checks the preset's choices and points them at tiny stand-ins (see the module docstring)."""
    tiny = tiny_params(policy, reward, **FAST)
    keep = {"policy_model": ["id"], "reward_model": ["id"], "data": ["source", "split", "eval_size",
            "max_prompt_tokens", "overlong"], "lora": ["r", "alpha"], "critic": ["lora_r", "lora_alpha"],
            "rollout": ["batch_size", "max_new_tokens", "micro_batch_size", "generation_chunk"],
            "ppo": ["epochs", "num_minibatches"], "eval": ["max_new_tokens", "generation_chunk"],
            "train": ["iterations"]}
    small = {section: {key: tiny[section].get(key, 2) if key != "generation_chunk" else 4 for key in keys}
             for section, keys in keep.items()}
    small["data"]["split"] = "validation"
    return f"""import yaml
p = yaml.safe_load(open("params.yaml"))
assert p["policy_model"]["id"] == "Qwen/Qwen3-0.6B", p["policy_model"]["id"]
assert p["reward_model"]["id"] == "Skywork/Skywork-Reward-V2-Qwen3-8B", p["reward_model"]["id"]
assert p["reward_model"]["kind"] == "classifier" and p["data"]["source"] == "trl-lib/tldr"
assert p["policy_model"]["dtype"] == "bfloat16" and p["eval"]["reference_cache"] is None
for section, values in {small!r}.items():
    p[section].update(values)
yaml.safe_dump(p, open("params.yaml", "w"), sort_keys=False)
print("stand-ins:", p["policy_model"]["id"], p["reward_model"]["id"])
"""


def fresh_clone(dest: Path, policy: Path, reward: Path) -> Path:
    repo = make_project(dest, tiny_params(policy, reward, **FAST))
    shutil.copy2(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # the shipped default remote
    shutil.copy2(ROOT / ".gitignore", repo / ".gitignore")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "as cloned"], repo)
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return repo


def script_for(block: str, stand_in: Path) -> str:
    lines = []
    for line in block.replace(SETUP, "").splitlines():
        lines.append(line)
        if re.match(r"\s*rlhf preset qwen3-skywork\b", line):
            lines.append(f"python {stand_in}")
    return "set -eo pipefail\n" + "\n".join(lines) + "\n"


def run_block(script: str, repo: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def test_readme_bash_blocks_run_on_a_tiny_project(tmp_path, tiny_policy, tiny_reward):
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 6 and starts_fresh(blocks[0]), "the README's quickstart block comes first"
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(stand_in_script(tiny_policy, tiny_reward))
    repo = None
    for n, block in enumerate(blocks):
        if repo is None or starts_fresh(block):
            repo = fresh_clone(tmp_path / f"clone-{n}" / "rlhf-dvc", tiny_policy, tiny_reward)
        result = run_block(script_for(block, stand_in), repo)
        assert result.returncode == 0, (f"README block {n + 1} failed ({result.returncode}):\n{block}\n"
                                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    state = json.loads((repo / "models/current/state.json").read_text())
    assert state["iteration"] >= 1  # the last block (the Qwen3 + Skywork switch) trained on its stand-ins
    assert yaml.safe_load((repo / "params.yaml").read_text())["policy_model"]["id"] == str(tiny_policy)
