"""What the project says to a user speaks of the project: no CLI help, stage help, log or error text and no
params.yaml comment talks about how the project was developed (sessions, reviews, issue numbers, targets, budgets)."""

import ast
import re
import subprocess

import pytest
import typer
from typer.testing import CliRunner

from conftest import ROOT, stage
from rlhf.cli import app

# Whole words only, and not inside a dotted or underscored params key (kl.target, token_budget, target_modules).
DEVELOPMENT = re.compile(r"(?<![\w.])(sessions?|missions?|reviews?|reviewers?|targets?|budgets?|acceptance)(?![\w.])"
                         r"|\(#\d+\)|\bissue #?\d+", re.IGNORECASE)
COMMANDS = sorted(typer.main.get_command(app).commands)
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py"))


def development_words(text: str) -> list[str]:
    return [m.group(0) for m in DEVELOPMENT.finditer(text)]


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="rlhf", env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_checked():
    assert {"init", "advance", "train", "plots", "preset", "report"} <= set(COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_cli_help_speaks_of_the_project(command):
    text = help_text(*([command] if command else []))
    assert "Usage: rlhf" in text
    assert not development_words(text), development_words(text)


@pytest.mark.parametrize("name", STAGES)
def test_stage_help_says_what_the_stage_does(name):
    """`python stages/<name>.py --help` shows the script's docstring (it once showed `__main__`)."""
    result = subprocess.run([*stage(name), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    doc = ast.get_docstring(ast.parse((ROOT / "stages" / f"{name}.py").read_text()))
    assert doc.splitlines()[0] in result.stdout and "__main__" not in result.stdout
    assert not development_words(result.stdout), development_words(result.stdout)


def string_literals(path):
    """Every piece of prose the code can print (log lines, error messages, help): string literals with a space in them,
    docstrings aside (flags and dict keys such as `--target` or 'targets' are not prose)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and " " in node.value.strip()
            and id(node) not in docstrings]


def test_log_and_error_text_speaks_of_the_project():
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for folder in ("rlhf", "stages", "bench") for path in sorted((ROOT / folder).rglob("*.py"))
             for line, text in string_literals(path) if DEVELOPMENT.search(text)]
    assert not found, "\n".join(found)


def test_params_comments_speak_of_the_project():
    lines = (ROOT / "params.yaml").read_text().splitlines()
    found = [f"params.yaml:{i}: {line.strip()}" for i, line in enumerate(lines, 1)
             if "#" in line and development_words(line.split("#", 1)[1])]
    assert not found, "\n".join(found)


# The pages a user reads describe the project as it is; its history is docs/changelog.md's, and the published runs
# under docs/runs/ are verbatim records (their own commands and outputs), so neither is checked here.
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "changelog.md")]
# A hex word of 7-40 characters with a digit and a letter: an abbreviated or full commit hash.
COMMIT_HASH = re.compile(r"(?<![\w./-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}(?![\w./-])")
# Phrasing that dates a statement to when it was written, or reports a decision instead of the state it led to.
NOTEBOOK = re.compile(r"\b(now|yet|untested|not tried|no longer|used to|then the default|earlier default|"
                      r"previous default|old default|before vs after|at the time|anymore)\b|:\s*dropped\b",
                      re.IGNORECASE)


def page_findings(pattern: re.Pattern) -> list[str]:
    return [f"{page.relative_to(ROOT)}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}"
            for page in PAGES for n, line in enumerate(page.read_text().splitlines(), 1)
            for m in pattern.finditer(line)]


def test_pages_name_no_commit_hashes():
    found = page_findings(COMMIT_HASH)
    assert not found, "commit hashes belong in the changelog or a run's record, not a page:\n" + "\n".join(found)


def test_pages_read_as_the_present_not_a_lab_notebook():
    found = page_findings(NOTEBOOK)
    assert not found, "lab-notebook phrasing (history belongs in docs/changelog.md):\n" + "\n".join(found)
