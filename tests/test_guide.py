"""docs/guide.md, run as a user would: every ```bash block of a section runs as one `bash -e` script on a tiny
project (the random-weight Qwen3 policy and reward of conftest), and the test checks what the block's comments and
the section's text say. The troubleshooting table's lines are produced by the mistakes it names, and the healthy
ranges are rebuilt from the published runs. ```sh blocks (several seeds, pushing to a remote) are not run here: the
seed runs have their own tests (test_seeds.py), the push and the clone elsewhere test_remote.py."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import BIN, ROOT, copy_repo, make_project, run, tiny_params

GUIDE = ROOT / "docs" / "guide.md"


def section(title: str) -> str:
    text = GUIDE.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def run_script(script: str, repo: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=900)
    if check:
        assert result.returncode == 0, f"{script}\nfailed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def run_section(title: str, repo: Path) -> str:
    blocks = bash_blocks(section(title))
    assert blocks, f"no bash block under '## {title}'"
    return "".join(run_script(block, repo).stdout for block in blocks)


def params_of(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def as_shipped(params: dict) -> dict:
    """Tiny sizes, but the model ids, reward kind and source path the shipped params.yaml has (what the guide's
    `sed` lines edit)."""
    params["policy_model"]["id"] = "embedded:smollm2-135m-instruct"
    params["reward_model"].update({"id": "embedded:all-minilm-l6-v2", "kind": "similarity"})
    return params


# --- fast: the guide's edits and tables against the shipped files ------------------------------------------------

def sed_lines(text: str) -> list[str]:
    return [line.split("#")[0].strip() for block in bash_blocks(text) for line in block.splitlines()
            if line.strip().startswith("sed -i") and "params.yaml" in line]


@pytest.mark.parametrize("page", ["docs/guide.md", "README.md"])
def test_every_sed_changes_the_shipped_params(tmp_path, page):
    """A `sed` whose pattern matches nothing exits 0 and changes nothing; against the shipped params.yaml (comments
    and number formats as a user has them) each one must change the value it is there to change."""
    lines = sed_lines((ROOT / page).read_text())
    assert lines, f"{page} has no sed line"
    for line in lines:
        shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
        before = yaml.safe_load((tmp_path / "params.yaml").read_text())
        subprocess.run(["bash", "-c", line], cwd=tmp_path, check=True)
        after = yaml.safe_load((tmp_path / "params.yaml").read_text())
        changed = [f"{s}.{k}" for s in before if isinstance(before[s], dict)
                   for k in before[s] if before[s][k] != after[s].get(k)]
        assert len(changed) >= 1, f"{page}: `{line}` changed no value of the shipped params.yaml"
        assert all(len(before[s]) == len(after[s]) for s in before if isinstance(before[s], dict)), line


def test_healthy_ranges_are_the_published_runs():
    """Each ranges table in the guide is what the command above it prints today from docs/runs/."""
    text = section("What a healthy run looks like")
    pairs = re.findall(r"```bash\n(python docs/runs/ranges\.py [^\n]+)\n```\n\n(\| metric \|.*?)\n\n", text, flags=re.S)
    assert len(pairs) == 2, "two ranges tables, each under its command"
    for command, table in pairs:
        printed = subprocess.run(["bash", "-c", command.replace("python ", f"{BIN}/python ", 1)], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
        assert printed == table.strip(), f"{command} prints:\n{printed}"


def test_guide_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/guide.md)" in readme
    for anchor in re.findall(r"docs/guide\.md#([\w-]+)", readme):
        assert f"\n## {anchor.replace('-', ' ')}" in GUIDE.read_text().lower(), anchor


# --- slow: the blocks on tiny projects --------------------------------------------------------------------------

@pytest.mark.slow
def test_own_prompts(tmp_path, tiny_policy, tiny_reward):
    repo = make_project(tmp_path / "repo", tiny_params(tiny_policy, tiny_reward))
    rows = pd.read_parquet(ROOT / "data" / "tldr" / "validation-1945.parquet").head(40)[["prompt", "completion"]]
    rows.loc[[3, 7, 11], "completion"] = ["", "  ", None]  # three rows without a human reference
    rows.to_json(repo / "my_prompts.jsonl", orient="records", lines=True)
    out = run_section("Your own prompts", repo)
    assert params_of(repo)["paths"]["source_data"] == "data/my_prompts.parquet"
    prepared = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert json.loads(out[out.index("{"):]) == prepared  # `cat metrics/prepare.json` printed it
    assert prepared["source_rows"] == 40 and prepared["skipped_missing_reference"] == 3
    assert prepared["eval_prompts"] == params_of(repo)["data"]["eval_size"]
    assert prepared["train_prompts"] + prepared["eval_prompts"] == 40 - sum(
        v for k, v in prepared.items() if k.startswith("skipped_"))


@pytest.mark.slow
def test_own_reward_model(tmp_path, tiny_policy, tiny_reward):
    repo = make_project(tmp_path / "repo", as_shipped(tiny_params(tiny_policy, tiny_reward)))
    run(["sed", "-i", f"s|^  id: embedded:smollm2-135m-instruct|  id: {tiny_policy}|", "params.yaml"], repo)
    shutil.copytree(tiny_reward, repo / "models" / "my-rm")
    shutil.copy2(ROOT / "data" / "tldr" / "comparisons-batch13-18.parquet", repo / "data" / "tldr")
    out = run_section("Your own reward model", repo)
    assert "ForSequenceClassification'] labels: 1 chat template: True" in out, out
    p = params_of(repo)["reward_model"]
    assert (p["id"], p["kind"]) == ("models/my-rm", "classifier")
    accuracy = json.loads((repo / "metrics" / "rm_accuracy.json").read_text())
    assert accuracy["pairs"] == 16, accuracy


@pytest.mark.slow
def test_own_policy(tmp_path, tiny_policy, tiny_reward):
    repo = make_project(tmp_path / "repo", as_shipped(tiny_params(tiny_policy, tiny_reward)))
    run(["sed", "-i", f"s|^  id: embedded:all-minilm-l6-v2|  id: {tiny_reward}|;s|^  kind: similarity|  kind: classifier|",
         "params.yaml"], repo)
    shutil.copytree(tiny_policy, repo / "models" / "my-policy")
    out = run_section("Your own policy", repo)
    linear = out.split("linear modules:")[1].splitlines()[0]
    assert all(name in linear for name in params_of(repo)["lora"]["target_modules"]), linear
    assert "chat template: True" in out
    assert params_of(repo)["policy_model"]["id"] == "models/my-policy"
    assert (repo / "data" / "prepared" / "train.parquet").exists()


def error_lines(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_troubleshooting_lines_come_from_the_mistakes_they_name(tmp_path, tiny_policy, tiny_reward, trained_repo):
    """Each mistake of the table, made on a tiny project; every line the table quotes must appear in what one of
    them printed, and every printed error must be one line (no traceback)."""
    fresh = make_project(tmp_path / "fresh", tiny_params(tiny_policy, tiny_reward))
    outputs = {}

    def attempt(name, command, repo, edit=None, setup=None):
        work = copy_repo(repo, tmp_path / name)
        if setup:
            setup(work)
        if edit:
            p = params_of(work)
            edit(p)
            (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        outputs[name] = error_lines(run_script(command, work, check=False))
        assert "Traceback" not in outputs[name], outputs[name]
        # one line of ours, and where a stage failed under `dvc repro`, DVC's own line after it
        assert 1 <= len([line for line in outputs[name].splitlines() if line.startswith(("error:", "ERROR:"))]) <= 2

    attempt("repro-before-init", "dvc repro", fresh)
    attempt("export-before-init", "rlhf export", fresh)
    attempt("advance-before-repro", "rlhf advance", fresh)
    attempt("init-twice", "rlhf init", trained_repo)
    attempt("unknown-key", "rlhf check-params", fresh, lambda p: p["lora"].update(rank=4))  # lora.r misspelt
    attempt("init-before-models", "rlhf init", fresh)
    attempt("target-modules", "dvc repro prepare reward_model sft && rlhf init", fresh, lambda p: p["lora"].update(target_modules=["q_proj", "qkv"]))
    attempt("no-reference-column", "dvc repro prepare", fresh,
            lambda p: p["paths"].update(source_data="data/no_completion.parquet"),
            lambda work: pd.read_parquet(work / "data/tldr/validation-1945.parquet")[["prompt"]].to_parquet(
                work / "data/no_completion.parquet"))
    attempt("too-few-prompts", "dvc repro prepare", fresh, lambda p: p["data"].update(eval_size=500))
    attempt("tag-taken", "rlhf init --force && rlhf train -n 1 --commit", trained_repo)
    no_template = tmp_path / "no-template-policy"
    shutil.copytree(tiny_policy, no_template)
    for f in no_template.glob("chat_template.*"):
        f.unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    attempt("no-chat-template", "dvc repro prepare", fresh, lambda p: p["policy_model"].update(id=str(no_template)))

    table = section("Troubleshooting")
    quoted = [q for cell in re.findall(r"^\| ([^|]*``[^|]*) \|", table, flags=re.M)
              for q in re.findall(r"``(.+?)``", cell)]
    assert len(quoted) >= 10
    everything = "\n".join(outputs.values())
    missing = [q for q in quoted if q not in everything]
    assert not missing, f"lines the guide quotes that no mistake printed: {missing}\n{everything[-6000:]}"


@pytest.mark.slow
def test_branch_and_start_over(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    blocks = bash_blocks(section("Resume, branch, start over"))
    assert len(blocks) == 2
    run_script(blocks[0], repo)
    assert params_of(repo)["optim"]["lr"] == 1.0e-4 and params_of(repo)["sft"]["lr"] == 2.0e-4
    assert json.loads((repo / "models/current/state.json").read_text())["iteration"] == 2
    tags = run(["git", "tag"], repo).stdout.split()
    assert "lr-1e-4-2" in tags and run(["git", "branch", "--show-current"], repo).stdout.strip() == "lr-1e-4"
    history = pd.read_csv(repo / "metrics" / "history.csv")
    assert list(history["iteration"]) == [0, 1, 2]  # iteration 1 once, though both the tag and advance record it
    out = run_script(blocks[1], repo).stdout
    assert list(pd.read_csv(repo / "metrics" / "history.csv")["iteration"]) == [0]
    assert out.count("\n") == 2  # `cat metrics/history.csv`: the header and iteration 0


@pytest.mark.slow
def test_disk_and_cleanup(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    plain = run(["dvc", "gc", "-f"], repo, check=False)
    assert plain.returncode != 0  # "dvc gc needs a scope (DVC 3 refuses it without one)"
    out = run_section("Disk and cleanup", repo)
    assert ".dvc/cache" in out
    # every tagged iteration survives the gc (iter-0 is the state alone: its dvc.lock has no iteration outputs yet)
    run(["git", "checkout", "-q", "iter-0"], repo)
    run(["dvc", "checkout", "models/current.dvc"], repo)
    assert json.loads((repo / "models/current/state.json").read_text())["iteration"] == 0
    run(["git", "checkout", "-q", "iter-1"], repo)
    run(["dvc", "checkout"], repo)
    assert json.loads((repo / "models/next/state.json").read_text())["iteration"] == 1


@pytest.mark.slow
def test_use_the_trained_model(tmp_path, trained_repo):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    run(["rlhf", "export", "--out", "models/export"], repo)
    out = run_section("Use the trained model", repo)
    assert "My landlord kept my deposit" in out  # the decoded prompt, then what the tiny random policy adds
