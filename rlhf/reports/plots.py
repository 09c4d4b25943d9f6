"""`rlhf plots`: DVC's plots (the `plots:` of dvc.yaml, as `dvc plots show --json` fills them with the data) drawn
to SVG by vl-convert, which runs Vega-Lite itself: no browser, no npm, no CDN, no network. Writes one SVG per plot, an
index.html that holds them inline, and on request one PNG sheet of all of them; the sample report (plain HTML) is
screenshotted by headless Chromium when one is installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rlhf.errors import ArtifactError
from rlhf.runtime.log import log


def specs(cwd: Path | None = None) -> tuple[dict[str, dict], list[str]]:
    """Vega-Lite spec per plot title (data inlined), and one line per plot DVC could not load."""
    result = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=cwd, capture_output=True,
                            text=True)
    try:
        shown = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise ArtifactError(f"dvc plots show: {((result.stderr or result.stdout).strip().splitlines() or ['no output'])[-1]}") from None
    out = {title: entries[0]["content"] for title, entries in shown.get("data", {}).items()
           if entries and entries[0].get("type") == "vega"}
    errors = [f"{e['source']}: {e['msg'].splitlines()[0]}" for e in shown.get("errors", []) if "source" in e]
    broken = [e["msg"].splitlines()[0] for e in shown.get("errors", []) if "source" not in e]
    if broken:  # not one plot's file: the project itself (dvc.yaml, params.yaml) could not be read
        raise ArtifactError(f"dvc plots show: {broken[0]}")
    return out, errors


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def draw(specs_by_title: dict[str, dict]) -> dict[str, str]:
    import vl_convert

    return {title: vl_convert.vegalite_to_svg(spec) for title, spec in specs_by_title.items()}


def _size(svg: str) -> tuple[float, float]:
    head = svg[:svg.index(">")]
    return (float(re.search(r'\bwidth="([\d.]+)"', head).group(1)),
            float(re.search(r'\bheight="([\d.]+)"', head).group(1)))


def sheet(svgs: list[str], columns: int = 3) -> str:
    """All charts on one SVG, in a grid (each chart keeps its own size; the cells are the largest chart's)."""
    sizes = [_size(s) for s in svgs]
    cell_w, cell_h = max(w for w, _ in sizes), max(h for _, h in sizes)
    cells = [s.replace("<svg", f'<svg x="{i % columns * cell_w}" y="{i // columns * cell_h}"', 1)
             for i, s in enumerate(svgs)]
    rows = -(-len(svgs) // columns)
    width, height = cell_w * min(columns, len(svgs)), cell_h * rows
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
            f'<rect width="100%" height="100%" fill="white"/>{"".join(cells)}</svg>')


def page(svgs: dict[str, str], missing: list[str]) -> str:
    figures = "\n".join(f'<figure id="{slug(t)}">{svg}</figure>' for t, svg in svgs.items())
    note = ("<p class=missing>Not drawn (no data yet): " + "; ".join(html.escape(m) for m in missing) + "</p>"
            if missing else "")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlhf-dvc plots</title>"
            "<style>body{font:14px system-ui,sans-serif;margin:16px} figure{display:inline-block;margin:0 8px 8px 0}"
            " .missing{color:#666}</style></head>"
            f"<body><h1>PPO curves</h1>{note}\n{figures}\n</body></html>")


def render(out_dir: Path, cwd: Path | None = None) -> dict[str, str]:
    """Draw every plot DVC can load into out_dir (one SVG each + index.html); returns the SVGs by title."""
    found, missing = specs(cwd)
    if not found:
        raise ArtifactError(f"dvc plots show: no plot has data yet ({'; '.join(missing) or 'no plots in dvc.yaml'}); "
                        "run an iteration first")
    svgs = draw(found)
    out_dir.mkdir(parents=True, exist_ok=True)
    for title, svg in svgs.items():
        (out_dir / f"{slug(title)}.svg").write_text(svg)
    (out_dir / "index.html").write_text(page(svgs, missing))
    if missing:
        log(f"plots: not drawn (no data yet): {'; '.join(missing)}")
    log(f"plots: {len(svgs)} charts in {out_dir / 'index.html'}")
    return svgs


def png_sheet(svgs: dict[str, str], png: Path, scale: float = 1.0) -> Path:
    import vl_convert

    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(vl_convert.svg_to_png(sheet(list(svgs.values())), scale=scale))
    return png


def chromium(url: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """Headless Chromium on url, in a browser profile of this call's own: Chromium refuses to start a second browser
    on a profile another one holds (two `rlhf plots` at once, e.g. in two experiments), and a shared profile would
    carry state from one call to the next."""
    with tempfile.TemporaryDirectory(prefix="rlhf-chromium-") as profile:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--virtual-time-budget=8000", f"--user-data-dir={profile}"]
        try:
            return subprocess.run(["chromium", *flags, *args, url], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ArtifactError(f"chromium on {url}: no result after {timeout} s") from None


def has_browser() -> bool:
    return shutil.which("chromium") is not None


def screenshot(html_file: Path, png: Path, width: int = 1400, height: int = 1800) -> Path:
    """png written from html_file, or an error: never an old PNG left in place as if it were the new one."""
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    result = chromium(html_file.resolve().as_uri(), f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    written = png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if result.returncode != 0 or not written:
        lines = [line for line in result.stderr.splitlines() if "ERROR" in line] or result.stderr.splitlines() or [""]
        png.unlink(missing_ok=True)
        raise ArtifactError(f"chromium could not screenshot {html_file} to {png} (exit code {result.returncode}): "
                            f"{lines[-1].strip()[:300]}")
    return png


def rendered_dom(html_file: Path) -> str:
    return chromium(html_file.resolve().as_uri(), "--dump-dom").stdout
