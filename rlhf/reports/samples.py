"""Per-iteration sample report: for the fixed held-out prompts, the post, this iteration's summary, reward and ROUGE-L
(the independent judge), the previous iteration's summary and reward, and the human reference, biggest reward changes
first (HTML + Markdown)."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import pandas as pd

from rlhf.artifacts.files import atomic_write_text


def archive(samples_jsonl: Path, metrics_dir: Path, iteration: int) -> Path:
    dest = Path(metrics_dir) / "samples" / f"iter-{iteration}.jsonl"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(samples_jsonl, dest)
    return dest


def compare(metrics_dir: Path, iteration: int) -> pd.DataFrame:
    folder = Path(metrics_dir) / "samples"
    now = pd.read_json(folder / f"iter-{iteration}.jsonl", lines=True)
    prev_file = folder / f"iter-{iteration - 1}.jsonl"
    if prev_file.exists():
        prev = pd.read_json(prev_file, lines=True)[["prompt_id", "summary", "reward"]]
        now = now.merge(prev.rename(columns={"summary": "previous", "reward": "previous_reward"}), on="prompt_id",
                        how="left")
    else:
        now = now.assign(previous=None, previous_reward=float("nan"))
    now["change"] = now["reward"] - now["previous_reward"]
    if "rouge_l" not in now.columns:  # an archive from before ROUGE was judged
        now["rouge_l"] = float("nan")
    return now.sort_values("change", key=lambda c: c.abs(), ascending=False, na_position="last").reset_index(drop=True)


def post_text(query: str) -> str:
    """The POST part of a trl-lib TL;DR prompt."""
    return query.split("POST:", 1)[-1].rsplit("TL;DR:", 1)[0].strip()


def _fmt(x: float) -> str:
    return "" if pd.isna(x) else f"{x:+.3f}" if x != 0 else "0.000"


def _num(x: float, digits: int = 3) -> str:
    return "" if pd.isna(x) else f"{x:.{digits}f}"


def render_html(df: pd.DataFrame, iteration: int) -> str:
    e = lambda s: html.escape("" if s is None or (isinstance(s, float) and pd.isna(s)) else str(s))  # noqa: E731
    rows = "\n".join(
        f"<tr><td class=post>{e(post_text(r.query))[:1200]}</td><td>{e(r.summary)}</td><td class=num>{r.reward:.3f}</td>"
        f"<td class=num>{_num(r.rouge_l)}</td>"
        f"<td>{e(r.previous)}</td><td class=num>{'' if pd.isna(r.previous_reward) else f'{r.previous_reward:.3f}'}</td>"
        f"<td class=num>{_fmt(r.change)}</td><td>{e(r.reference)}</td></tr>"
        for r in df.itertuples())
    mean_change = df["change"].mean()
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Samples, iteration {iteration}</title>
<style>body{{font:14px system-ui,sans-serif;margin:24px}}table{{border-collapse:collapse;width:100%}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}th{{background:#f3f3f3;position:sticky;top:0}}
.post{{max-width:420px;font-size:12px;color:#444}}.num{{text-align:right;font-variant-numeric:tabular-nums}}</style>
</head><body><h1>Held-out samples, iteration {iteration}</h1>
<p>{len(df)} prompts · mean reward {df['reward'].mean():.4f} · mean ROUGE-L {_num(df['rouge_l'].mean(), 4)} · mean change vs. iteration {iteration - 1}:
{_fmt(mean_change)} · sorted by |reward change|</p>
<table id="samples"><thead><tr><th>post</th><th>summary (iteration {iteration})</th><th>reward</th><th>ROUGE-L</th>
<th>previous summary</th><th>previous reward</th><th>change</th><th>human reference</th></tr></thead><tbody>
{rows}
</tbody></table></body></html>
"""


def render_markdown(df: pd.DataFrame, iteration: int) -> str:
    cell = lambda s: "" if s is None or (isinstance(s, float) and pd.isna(s)) else " ".join(str(s).split()).replace("|", "\\|")[:300]  # noqa: E731
    lines = [f"# Held-out samples, iteration {iteration} (biggest reward changes first)", "",
             "| post | summary | reward | ROUGE-L | previous summary | change | reference |",
             "|---|---|---:|---:|---|---:|---|"]
    lines += [f"| {cell(post_text(r.query))} | {cell(r.summary)} | {r.reward:.3f} | {_num(r.rouge_l)} | {cell(r.previous)} | "
              f"{_fmt(r.change)} | {cell(r.reference)} |" for r in df.itertuples()]
    return "\n".join(lines) + "\n"


def write(metrics_dir: Path, iteration: int) -> Path:
    df = compare(metrics_dir, iteration)
    out = Path(metrics_dir) / "report.html"
    atomic_write_text(out, render_html(df, iteration))
    atomic_write_text(Path(metrics_dir) / "report.md", render_markdown(df, iteration))
    return out
