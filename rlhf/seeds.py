"""`rlhf seeds run`: the same configuration under several seeds.

Each seed gets its own git worktree of the commit HEAD names when the run starts (`<out>/seed-<s>`, the working
tree's params.yaml copied in, then `seed: <s>` and any `--set key=value`), and `rlhf train -n N` runs there, one seed
after another (a run that stopped is continued, not restarted, and only from that same commit: commits made while the
seeds train never reach the seeds still to come). `data.split_seed` is not changed, so every seed is judged on the same held-out prompts.
What the seeds say together (`report`, `compare`, `table`) is rlhf/reports/seeds.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rlhf.artifacts import record
from rlhf.errors import StateError
from rlhf.runtime.log import log


def run(seeds: list[int], iterations: int, out: Path, overrides: list[str], params_file: Path) -> list[Path]:
    """Train each seed in its own worktree of the commit HEAD names when the run starts; returns the run folders."""
    import yaml

    from rlhf.config.params import parse_params, read_yaml

    # Every seed's params are built and checked before the first worktree: a worktree left behind by a refused
    # override would be continued later with the params it was made with.
    pairs = [split_override(o) for o in overrides]
    if any(key == "seed" for key, _ in pairs):  # it would give every run the same seed
        raise StateError("--set seed=...: each run sets its own seed; choose the seeds with --seed")
    params_of = {}
    for seed in seeds:
        raw = read_yaml(params_file)  # a key written twice is refused here too
        for key, value in [("seed", str(seed)), *pairs]:
            set_key(raw, key, parse_value(value))
        parse_params(raw)
        params_of[seed] = raw
    # HEAD once: a commit made while the seeds train must not reach the seeds still to come (one folder, one code)
    commit = git_head(Path.cwd())
    for seed in seeds:
        folder = out / f"seed-{seed}"
        if folder.exists() and (made_from := git_head(folder)) != commit:
            raise StateError(f"{folder} was made from commit {made_from[:12]}, HEAD is {commit[:12]}: the seeds of one "
                             f"folder run one commit's code (continue it from a checkout of {made_from[:12]}, or use "
                             "another --out)")
    folders = []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        if not folder.exists():
            out.mkdir(parents=True, exist_ok=True)
            made = subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], capture_output=True,
                                  text=True)
            if made.returncode != 0:
                raise StateError(f"git worktree add {folder} failed: {made.stderr.strip()}")
            clear_run_outputs(folder)
            (folder / "params.yaml").write_text(yaml.safe_dump(params_of[seed], sort_keys=False))
        done = done_iterations(folder)
        if done < iterations:
            log(f"seeds: seed {seed}: {done} of {iterations} iterations done; training in {folder}")
            # the worktree's code first, not an installed copy; a PYTHONPATH already set stays behind it
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(folder.resolve()),
                                                                            os.environ.get("PYTHONPATH")]))}
            with open(folder / "train.log", "a") as out_log:
                result = subprocess.run([sys.executable, "-m", "rlhf.cli", "train", "-n", str(iterations - done)],
                                        cwd=folder, env=env, stdout=out_log, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise StateError(f"seeds: seed {seed} failed (exit {result.returncode}); see {folder / 'train.log'}")
        folders.append(folder)
    return folders


def git_head(folder: Path) -> str:
    found = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True)
    if found.returncode != 0:
        raise StateError(f"{folder}: not a git checkout with a commit ({found.stderr.strip()})")
    return found.stdout.strip()


def clear_run_outputs(folder: Path) -> None:
    """A worktree of a commit made by `rlhf train --commit` holds that run's history and held-out tables; a seed
    run starts from none of them (they would count as its own iterations)."""
    from rlhf.project import clear_history

    clear_history(folder / "metrics")
    (folder / "metrics" / "eval.json").unlink(missing_ok=True)


def split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise StateError(f"--set {text!r}: expected key=value, e.g. optim.lr=1e-4")
    return key, value


def parse_value(text: str):
    """A --set value as YAML, except that a number YAML 1.1 reads as a string (1e-4 has no dot) is a number."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def set_key(raw: dict, dotted: str, value) -> None:
    *sections, leaf = dotted.split(".")
    node = raw
    for section in sections:
        if not isinstance(node.get(section), dict):
            raise StateError(f"--set {dotted}: params.yaml has no section {section!r}")
        node = node[section]
    if leaf not in node:
        raise StateError(f"--set {dotted}: params.yaml has no key {dotted!r}")
    node[leaf] = value


def done_iterations(folder: Path) -> int:
    """Iterations of a run that are recorded in its history (0 when none: iteration 0 alone is no iteration)."""
    rows = read_history(folder)
    return max((int(r["iteration"]) for r in rows), default=0)


def read_history(folder: Path) -> list[dict]:
    return record.read_history(folder / "metrics" / "history.csv")
