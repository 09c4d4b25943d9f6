"""What users look at: the plots page and the sample report, rendered by headless Chromium from a real (tiny) run."""

import re
import shutil

import pandas as pd
import pytest

from conftest import ROOT, copy_repo, run

needs_browser = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("npm")),
                                   reason="needs Debian's chromium and npm (installed by .ci/setup)")


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


@needs_browser
def test_plots_and_report_render_in_headless_chromium(project):
    from rlhf.reports.plots import rendered_dom

    cache = ROOT / ".cache" / "vega"
    out = run(["rlhf", "plots", "--screenshots", "--vega-cache", str(cache)], project).stdout
    assert "plots.png" in out
    page = project / "metrics/plots/index.html"
    assert "cdn.jsdelivr" not in page.read_text()  # renders offline
    dom = rendered_dom(page)
    charts = len(re.findall(r'<canvas[^>]*class="marks"', dom)) + len(re.findall(r'<svg[^>]*class="marks"', dom))
    assert charts >= 12, f"only {charts} charts rendered"  # 10 across iterations + per-step curves
    for png in ("plots.png", "report.png"):
        data = (project / "metrics/plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    report_dom = rendered_dom(project / "metrics/report.html")
    assert report_dom.count("<tr>") >= 5 and 'id="samples"' in report_dom
