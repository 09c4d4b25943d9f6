"""What users look at: the plots page (drawn offline by vl-convert) and the sample report (screenshotted by headless
Chromium), from a real (tiny) run."""

import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from conftest import BIN, ROOT, copy_repo, run

needs_browser = pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (.ci/setup)")


@pytest.fixture(scope="module")
def project(tmp_path_factory, trained_repo):
    return copy_repo(trained_repo, tmp_path_factory.mktemp("plots") / "repo")


def test_sample_report_compares_with_previous_iteration(project):
    html = (project / "metrics/report.html").read_text()
    assert "Held-out samples, iteration 1" in html and "previous summary" in html
    now = pd.read_json(project / "metrics/samples/iter-1.jsonl", lines=True)
    prev = pd.read_json(project / "metrics/samples/iter-0.jsonl", lines=True)
    assert len(now) == len(prev) == 4
    changes = [float(x) for x in re.findall(r"<td class=num>([+-]\d\.\d{3}|0\.000)</td><td>[^<]*</td></tr>", html)]
    assert len(changes) == len(now)  # one change cell per row
    assert changes == sorted(changes, key=abs, reverse=True)  # biggest changes on top
    md = (project / "metrics/report.md").read_text()
    assert md.count("\n|") >= 2 + len(now)


def test_sample_report_puts_the_biggest_reward_changes_first(tmp_path):
    """The trained run's changes may all be 0 (then any order passes); here they are distinct and of both signs."""
    from rlhf.reports import samples

    before = {0: 0.5, 1: 0.2, 2: -0.1, 3: 0.9, 4: 0.0}
    change = {0: 0.05, 1: -0.4, 2: 0.2, 3: -0.01, 4: 0.3}
    folder = tmp_path / "samples"
    folder.mkdir()
    for iteration, reward in ((0, before), (1, {i: before[i] + change[i] for i in before})):
        pd.DataFrame({"prompt_id": list(reward), "query": [f"POST: post {i} TL;DR:" for i in reward],
                      "summary": [f"summary {i} at {iteration}" for i in reward], "reward": list(reward.values()),
                      "reference": ["ref"] * len(reward)}).to_json(folder / f"iter-{iteration}.jsonl",
                                                                   orient="records", lines=True)
    samples.write(tmp_path, 1)
    html = (tmp_path / "report.html").read_text()
    shown = [float(x) for x in re.findall(r"<td class=num>([+-]\d\.\d{3}|0\.000)</td><td>[^<]*</td></tr>", html)]
    assert shown == [-0.4, 0.3, 0.2, 0.05, -0.01]
    assert [html.index(f"post {i}") for i in (1, 4, 2, 0, 3)] == sorted(html.index(f"post {i}") for i in range(5))
    md = (tmp_path / "report.md").read_text()
    assert md.index("summary 1 at 1") < md.index("summary 4 at 1") < md.index("summary 3 at 1")


def test_plots_are_drawn_with_no_npm_no_browser_and_no_network(project, tmp_path):
    """PATH holds only the venv and git (no npm, no node, no chromium) and every proxy points at a closed port, so
    nothing can be fetched: the SVGs, the page and plots.png must still come out."""
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "git").symlink_to(shutil.which("git"))
    offline = "http://127.0.0.1:9"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{bare}", "PYTHONPATH": str(ROOT), "HTTP_PROXY": offline,
           "HTTPS_PROXY": offline, "http_proxy": offline, "https_proxy": offline, "NO_PROXY": "", "no_proxy": ""}
    assert not any(shutil.which(tool, path=env["PATH"]) for tool in ("npm", "node", "chromium"))
    images = tmp_path / "images"
    result = subprocess.run(["rlhf", "plots", "--screenshots", "--images", str(images)], cwd=project, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    out = project / "metrics/plots"
    svgs = sorted(out.glob("*.svg"))
    assert len(svgs) >= 14  # 13 across iterations + sft loss + the update's per-step curves
    for svg in svgs:
        text = svg.read_text()
        assert text.startswith("<svg") and 'class="marks"' in text and "<path" in text, svg.name
    page = (out / "index.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/", "")  # nothing to fetch
    assert page.count('<svg') == len(svgs) and "not drawn" not in page.lower()
    assert 'id="held-out-reward"' in page and "held-out reward</text>" in page  # the chart and its drawn title
    png = (images / "plots.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000
    assert not (images / "report.png").exists() and "chromium not found" in result.stderr


def test_plots_says_in_one_line_when_there_is_nothing_to_draw(tmp_path):
    from conftest import make_project, tiny_params

    repo = make_project(tmp_path / "repo", tiny_params("tiny-policy", "tiny-reward"), source_rows=10)
    result = run(["rlhf", "plots"], repo, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: dvc plots show: no plot has data yet")


@needs_browser
def test_screenshots_go_to_the_images_folder(project):
    out = run(["rlhf", "plots", "--screenshots"], project).stdout
    assert "docs/images/plots.png" in out and "docs/images/report.png" in out
    for png in ("plots.png", "report.png"):
        data = (project / "docs/images" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from rlhf.reports.plots import rendered_dom

    report_dom = rendered_dom(project / "metrics/report.html")
    assert report_dom.count("<tr>") >= 5 and 'id="samples"' in report_dom


def _plots_env(path_first: str | None = None) -> dict:
    path = os.pathsep.join(p for p in (path_first, BIN, os.environ["PATH"]) if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT)}


@needs_browser
def test_two_screenshot_runs_at_once_both_write_their_pngs(project, tmp_path):
    """Two `rlhf plots --screenshots` at once (two experiments, two folders): each browser gets a profile of its
    own, so neither is turned away by the other's."""
    calls = [subprocess.Popen(["rlhf", "plots", "--screenshots", "--out", str(tmp_path / f"plots{i}"), "--images",
                               str(tmp_path / f"images{i}")], cwd=project, env=_plots_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [call.communicate(timeout=300) for call in calls]
    assert [call.returncode for call in calls] == [0, 0], outputs
    for i in range(2):
        data = (tmp_path / f"images{i}" / "report.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, i


def test_a_failed_screenshot_is_an_error_and_leaves_no_old_png(project, tmp_path):
    """A browser that fails (here one that exits 1 without writing) makes the command fail in one line; the PNG of an
    earlier run is not left behind as if it were this one's."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "chromium").write_text("#!/bin/sh\necho '[1:1:ERROR:x.cc] cannot open the display' >&2\nexit 1\n")
    (fake / "chromium").chmod(0o755)
    images = tmp_path / "images"
    images.mkdir()
    (images / "report.png").write_bytes(b"\x89PNG\r\n\x1a\nan earlier run's")
    result = subprocess.run(["rlhf", "plots", "--screenshots", "--out", str(tmp_path / "plots"), "--images",
                             str(images)], cwd=project, env=_plots_env(str(fake)), capture_output=True, text=True)
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: chromium could not screenshot ") and "cannot open the display" in last, last
    assert "Traceback" not in result.stderr and not (images / "report.png").exists()
