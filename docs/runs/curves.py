"""Draw a run's per-iteration curves from its history CSV (metrics/history.csv) as an SVG, and a PNG of it through
headless Chromium when one is installed. No plotting library needed.

    python docs/runs/curves.py docs/runs/<name>/history.csv docs/runs/<name>/curves.png
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PANELS = [  # title, [(column, label, colour)], band (low, high) columns or None, fixed y-range or None
    ("held-out reward (mean over prompts)", [("eval/reward_mean", "reward", "#1f77b4")], None, None),
    ("Δ reward vs iteration 0, 95% paired bootstrap",
     [("eval/reward_delta_vs_initial", "Δ reward", "#1f77b4")],
     ("eval/reward_delta_vs_initial_ci_low", "eval/reward_delta_vs_initial_ci_high"), None),
    ("win rate vs iteration 0, 95% interval", [("eval/win_rate_vs_initial", "win rate", "#2ca02c")],
     ("eval/win_rate_vs_initial_ci_low", "eval/win_rate_vs_initial_ci_high"), (0.0, 1.0)),
    ("EOS rate and repeated 3-grams", [("eval/eos_rate", "EOS rate", "#d62728"),
                                       ("eval/repeated_3gram_fraction", "repeated 3-grams", "#9467bd")],
     None, (0.0, 1.0)),
    ("KL to the reference (per response, exact)", [("eval/kl_mean", "KL", "#ff7f0e")], None, None),
    ("mean length (tokens)", [("eval/length_mean", "length", "#8c564b")], None, None),
]
W, H, PAD = 380, 230, 46


def number(value: str) -> float | None:
    return float(value) if value not in ("", None) else None


def panel(rows: list[dict], title: str, series, band, fixed) -> str:
    xs = [int(r["iteration"]) for r in rows]
    values = [number(r[c]) for c, _, _ in series for r in rows] + (
        [number(r[c]) for c in band for r in rows] if band else [])
    values = [v for v in values if v is not None]
    lo, hi = fixed or (min(values), max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = (lo, hi) if fixed else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    x_max = max(max(xs), 1)

    def px(x: float) -> float:
        return PAD + x / x_max * (W - PAD - 12)

    def py(y: float) -> float:
        return H - 28 - (y - lo) / (hi - lo) * (H - 28 - 26)

    out = [f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="12">{title}</text>',
           f'<line x1="{PAD}" y1="{H - 28}" x2="{W - 12}" y2="{H - 28}" stroke="#444"/>',
           f'<line x1="{PAD}" y1="26" x2="{PAD}" y2="{H - 28}" stroke="#444"/>']
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        out.append(f'<text x="{PAD - 4}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="10">{y:.3g}</text>')
        out.append(f'<line x1="{PAD}" y1="{py(y):.1f}" x2="{W - 12}" y2="{py(y):.1f}" stroke="#eee"/>')
    step = max(1, x_max // 10)
    for x in range(0, x_max + 1, step):
        out.append(f'<text x="{px(x):.1f}" y="{H - 14}" text-anchor="middle" font-size="10">{x}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 2}" text-anchor="middle" font-size="10">iteration</text>')
    if band:
        pts = [(x, number(r[band[0]]), number(r[band[1]])) for x, r in zip(xs, rows)]
        pts = [p for p in pts if p[1] is not None and p[2] is not None]
        poly = [f"{px(x):.1f},{py(h):.1f}" for x, _, h in pts] + [f"{px(x):.1f},{py(l):.1f}" for x, l, _ in pts[::-1]]
        out.append(f'<polygon points="{" ".join(poly)}" fill="{series[0][2]}" fill-opacity="0.18" stroke="none"/>')
    for i, (col, label, colour) in enumerate(series):
        pts = [(x, number(r[col])) for x, r in zip(xs, rows) if number(r[col]) is not None]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in pts]
        if len(series) > 1:
            out.append(f'<text x="{W - 14}" y="{36 + 12 * i}" text-anchor="end" font-size="10" fill="{colour}">{label}</text>')
    return "\n".join(out)


def render_svg(rows: list[dict]) -> str:
    cols = 3
    nrows = (len(PANELS) + cols - 1) // cols
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * cols}" height="{H * nrows}" '
             f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>']
    for k, spec in enumerate(PANELS):
        parts.append(f'<g transform="translate({W * (k % cols)},{H * (k // cols)})">{panel(rows, *spec)}</g>')
    return "\n".join(parts + ["</svg>"])


def main(history: Path, png: Path) -> None:
    rows = list(csv.DictReader(history.open()))
    svg = render_svg(rows)
    png.with_suffix(".svg").write_text(svg)
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print(f"wrote {png.with_suffix('.svg')} (no Chromium for the PNG)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "curves.html"
        page.write_text(f'<html><body style="margin:0">{svg}</body></html>')
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png.resolve()}",
                        f"--window-size={W * 3},{H * ((len(PANELS) + 2) // 3)}", page.as_uri()],
                       check=True, capture_output=True)
    print(f"wrote {png} and {png.with_suffix('.svg')}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
