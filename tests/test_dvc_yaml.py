"""dvc.yaml's code dependencies are complete: each stage depends on its script and on every file of the rlhf package
that script can import, so editing code makes exactly the stages it can affect stale."""

import ast
from pathlib import Path

import yaml

from conftest import ROOT, make_project, ran_stages, run, tiny_params


def imported_modules(path: Path) -> set[str]:
    """Every rlhf module a file imports, at top level or inside functions (stage scripts import inside main)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rlhf":
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from rlhf import ppo`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "rlhf")
    return found


def module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def code_closure(script: Path) -> set[Path]:
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(module_file, imported_modules(path)) if f is not None]
    return {p for p in seen if p.name != "__init__.py"}


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_the_code_it_runs():
    for name, stage in stages().items():
        script = next(part for part in stage["cmd"].split() if part.startswith("stages/"))
        deps = [ROOT / d for d in stage["deps"] if not d.startswith("${")]
        covered = lambda f: any(f == d or d in f.parents for d in deps)  # noqa: E731 - a file, or inside a folder
        missing = sorted(str(f.relative_to(ROOT)) for f in code_closure(ROOT / script) if not covered(f))
        assert not missing, f"stage {name}: dvc.yaml deps miss {missing}"


def test_no_stage_depends_on_code_it_cannot_run():
    """The other direction, so a code edit does not rerun stages it cannot affect: a listed file or folder must hold
    at least one file of the stage's import closure."""
    for name, stage in stages().items():
        script = next(part for part in stage["cmd"].split() if part.startswith("stages/"))
        closure = code_closure(ROOT / script)
        for dep in (d for d in stage["deps"] if d.startswith(("rlhf", "stages"))):
            path = ROOT / dep
            assert any(f == path or path in f.parents for f in closure), f"stage {name}: {dep} is never run by it"


def test_editing_the_sampler_makes_rollout_and_what_follows_stale(tmp_path, tiny_policy, tiny_reward):
    repo = make_project(tmp_path / "repo", tiny_params(tiny_policy, tiny_reward))
    run(["rlhf", "train", "--iterations", "1"], repo)
    assert ran_stages(run(["dvc", "repro"], repo).stdout)  # iteration 2 from the advanced state
    assert "up to date" in run(["dvc", "status"], repo).stdout
    sampler = repo / "rlhf" / "models" / "sampling.py"
    sampler.write_text(sampler.read_text() + "\n# an edit\n")
    status = run(["dvc", "status", "--json"], repo).stdout
    stale = set(yaml.safe_load(status))
    assert {"rollout", "reference", "update", "evaluate"} <= stale, stale
    assert not {"prepare", "sample", "policy_model", "reward_model", "reward", "advantages"} & stale, stale
