"""Off a terminal, a stage's stderr holds its own log lines only: no library progress bars, no warnings."""

import re

import pytest
import yaml

from conftest import copy_repo, run, stage

NOISE = re.compile(r"loading weights|warn|it/s\]|\r", re.IGNORECASE)


def set_warm(repo, on: bool) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["runtime"]["warm_start"] = on
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.mark.parametrize("warm", [True, False])
def test_model_stages_log_no_bars_and_no_warnings(tmp_path, trained_repo, warm):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    set_warm(repo, warm)
    for name in ("advantages", "rollout"):  # advantages read pyarrow columns; rollout loads the policy (after: it
        # writes a new rollout that the existing scores no longer match)
        result = run(stage(name), repo)  # stderr is a pipe here, not a terminal
        noisy = [line for line in result.stderr.splitlines() if NOISE.search(line)]
        assert noisy == [], f"{name}: {noisy}"
        assert result.stderr.strip().startswith(f"{name}: ")  # its own log line is still there
        assert re.search(rf"^{name}: stage took \d+\.\d s$", result.stderr, re.M), result.stderr  # and its wall time
