"""`rlhf plots`: render `dvc plots show` to HTML that works offline (vega scripts inlined instead of CDN links).

The vega/vega-lite/vega-embed builds come from the npm registry once (`npm pack`, see .ci/screenshots) into a
cache folder; the page then renders with no network, e.g. in headless Chromium for screenshots."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from rlhf.runtime.log import log

VEGA_PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # the versions dvc-render links


def vega_scripts(cache: Path) -> str:
    cache.mkdir(parents=True, exist_ok=True)
    scripts = []
    for name, version in VEGA_PACKAGES.items():
        tgz = cache / f"{name}-{version}.tgz"
        if not tgz.exists():
            subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=cache, check=True, capture_output=True)
        with tarfile.open(tgz) as tar:
            js = tar.extractfile(f"package/build/{name}.min.js").read().decode()
        scripts.append(f"<script>/* {name}@{version} */\n{js}\n</script>")
    return "\n".join(scripts)


def template(scripts: str) -> str:
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>rlhf-dvc plots</title>\n" + scripts +
            "\n<style>body{font:14px system-ui,sans-serif;margin:16px} table{border-spacing:15px}</style>"
            "</head><body><h1>PPO curves</h1>{plot_divs}</body></html>")


def render(out_dir: Path, cache: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tpl = out_dir / "template.html"
    tpl.write_text(template(vega_scripts(cache)))
    cmd = [sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(tpl), "-o", str(out_dir)]
    result = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if "failed to load" in result.stdout + result.stderr:  # dvc exits 0 even when it drops plots
        raise RuntimeError(f"dvc plots show: {(result.stdout + result.stderr).strip()}")
    log(f"plots: {out_dir / 'index.html'}")
    return out_dir / "index.html"


def chromium(url: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", "--virtual-time-budget=8000", "--user-data-dir=/tmp/rlhf-chromium"]
    return subprocess.run(["chromium", *flags, *args, url], capture_output=True, text=True, timeout=timeout)


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2600) -> Path:
    chromium(html.resolve().as_uri(), f"--screenshot={png.resolve()}", f"--window-size={width},{height}")
    return png


def rendered_dom(html: Path) -> str:
    return chromium(html.resolve().as_uri(), "--dump-dom").stdout
