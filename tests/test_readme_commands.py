"""The README's commands, run as a user would type them, on a tiny project.

Every ```bash block of README.md runs, top to bottom, as one `bash -e` script in a git + DVC project built like a
fresh clone (this project's dvc.yaml, .dvc/config, .gitignore and a slice of the real data, with the tiny random
Qwen3 models of conftest in params.yaml and `.venv` linking the running environment). A block that starts from a
fresh clone (it runs `.ci/setup` or a plain `rlhf init`) gets a new project; every other block continues in the
project the previous block left. Each command line runs on its own, and what its comment claims is checked: the
stages `dvc status` lists and `dvc repro` runs, that a `sed` changed params.yaml, the tags a command makes, what
`dvc exp show`, `dvc params diff` and `dvc plots diff` print. Two things differ from a user's machine, both stated here:
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

from conftest import BIN, ROOT, make_project, ran_stages, run, tiny_params

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


def commands(block: str, stand_in: Path) -> list[str]:
    """The block's command lines, one by one (the README has no multi-line commands), with the stand-in step after
    `rlhf preset qwen3-skywork`."""
    out = []
    for line in block.replace(SETUP, "").splitlines():
        if line.strip():
            out.append(line)
        if re.match(r"\s*rlhf preset qwen3-skywork\b", line):
            out.append(f"python {stand_in}")
    return out


def run_line(line: str, repo: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    return subprocess.run(["bash", "-c", "set -eo pipefail\n" + line], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=900)


STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def named_stages(comment: str) -> set[str]:
    return {s for s in STAGES if re.search(rf"(?<![\w/.]){s}(?![\w/])", comment)}


def status_stages(output: str) -> set[str]:
    """The stages `dvc status` lists: its unindented `name:` lines."""
    return {line[:-1] for line in output.splitlines() if line.endswith(":") and not line[0].isspace()
            and line[:-1] in STAGES}


def state_iteration(repo: Path, folder: str) -> int:
    return json.loads((repo / folder / "state.json").read_text())["iteration"]


def check_claims(line: str, result: subprocess.CompletedProcess, repo: Path, params_before: str) -> None:
    """What the line's comment says about its command, checked on what it did."""
    command, _, comment = line.partition("#")
    command, out = command.strip(), result.stdout + result.stderr
    ran = set(ran_stages(result.stdout))
    if command.startswith("sed -i") and "params.yaml" in command:
        assert (repo / "params.yaml").read_text() != params_before, f"`{command}` changed nothing in params.yaml"
    if re.fullmatch(r"dvc status", command):
        assert status_stages(result.stdout) == named_stages(comment.split(":")[0]), (comment, result.stdout)
    if "nothing runs" in comment:
        assert ran == set(), f"`{command}` ran {sorted(ran)}"
    elif command.endswith("dvc repro") or command.startswith("dvc exp run"):
        claimed = named_stages(comment)
        if "…" in comment:  # a range: "sample … update"
            assert claimed <= ran, (comment, sorted(ran))
        elif claimed:
            assert ran == claimed, (comment, sorted(ran))
    tags = run(["git", "tag"], repo).stdout.split()
    for tag in re.findall(r"tagged ([\w.]+-\d+)\b", comment):  # iter-3
        assert tag in tags, f"no tag {tag} after `{command}`"
    for prefix in re.findall(r"tagged ([\w.]+-)N\b", comment):  # qwen3-N: one per iteration trained
        assert f"{prefix}{state_iteration(repo, 'models/current')}" in tags, (command, tags)
    if command.startswith("rlhf advance"):
        assert state_iteration(repo, "models/current") == state_iteration(repo, "models/next")
    if command.startswith("dvc params diff") and "→" in comment:
        key, values = comment.split()[0], re.findall(r"[\d.]+", comment.split(" ", 1)[1])
        assert key in result.stdout and all(v in result.stdout for v in values), result.stdout
    if command.startswith("dvc metrics diff"):
        # only what differs (`--all` for every metric): β itself differs between the two
        assert "Change" in result.stdout and "objective/kl_coef" in result.stdout, result.stdout
    if command.startswith("dvc exp show"):
        head, name = re.search(r"HEAD \((\S+)\) and its experiment (\S+?);", comment).groups()
        assert all(s in result.stdout for s in (head, name, "kl.coef")), result.stdout
        # "-T adds every tag": a tag on another commit shows with -T only
        run(["git", "tag", "some-other-run", "HEAD~1"], repo)
        with_tags = run(command.replace("dvc exp show", "dvc exp show -T").split(), repo).stdout
        without = run(command.split("#")[0].split(), repo).stdout
        run(["git", "tag", "-d", "some-other-run"], repo)
        assert "some-other-run" in with_tags and "some-other-run" not in without, (with_tags, without)
    if command.startswith("dvc plots diff"):
        page = (repo / command.split("-o ")[1].split()[0] / "index.html").read_text()
        assert "kl-0.1" in page and "train/plots/metrics" in page, "the update's per-step curves of both"
    if command.startswith("rlhf export"):
        out_dir = repo / command.split("--out ")[1].split()[0]
        assert all((out_dir / kind / "README.md").exists() for kind in ("adapter", "merged"))


def test_readme_bash_blocks_run_on_a_tiny_project(tmp_path, tiny_policy, tiny_reward):
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5 and starts_fresh(blocks[0]), "the README's quickstart block comes first"
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(stand_in_script(tiny_policy, tiny_reward))
    repo = None
    for n, block in enumerate(blocks):
        if repo is None or starts_fresh(block):
            repo = fresh_clone(tmp_path / f"clone-{n}" / "rlhf-dvc", tiny_policy, tiny_reward)
        for line in commands(block, stand_in):
            params_before = (repo / "params.yaml").read_text()
            result = run_line(line, repo)
            assert result.returncode == 0, (f"README block {n + 1}: `{line}` failed ({result.returncode}):\n"
                                            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
            check_claims(line, result, repo, params_before)
        if n == 0:  # the quickstart: the run has train.iterations iterations
            iterations = yaml.safe_load((repo / "params.yaml").read_text())["train"]["iterations"]
            assert state_iteration(repo, "models/current") == iterations
    assert state_iteration(repo, "models/current") >= 1  # the last block (the Qwen3 + Skywork switch) trained
    assert yaml.safe_load((repo / "params.yaml").read_text())["policy_model"]["id"] == str(tiny_policy)
