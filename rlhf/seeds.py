"""`rlhf seeds`: the same configuration under several seeds, and what the seeds say together.

`run` gives each seed its own git worktree of HEAD (`<out>/seed-<s>`, the working tree's params.yaml copied in, then
`seed: <s>` and any `--set key=value`), and runs `rlhf train -n N` there, one seed after another (a run that stopped
is continued, not restarted). `data.split_seed` is not changed, so every seed is judged on the same held-out prompts.

`report` reads every `seed-*/metrics/history.csv` under a folder and writes, per iteration, the mean and the spread
(sample standard deviation, min, max) across seeds of the held-out metrics, with one curve per seed
(seeds.csv, seeds.md, seeds.vl.json and seeds.svg/.png where vl-convert is installed).

`compare A B` pairs two such folders seed by seed and prompt by prompt (same seeds, same held-out prompts): per
iteration, B − A on ROUGE-L and on the reward, per seed and pooled, with a paired bootstrap interval over
(seed, prompt) pairs and the number of seeds where B is ahead.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from rlhf.errors import StateError
from rlhf.runtime.log import log

METRICS = {  # history.csv column → label
    "eval/reward_mean": "reward", "eval/rouge_l_mean": "ROUGE-L", "eval/win_rate_vs_initial": "win rate vs it. 0",
    "eval/rouge_l_win_rate_vs_initial": "ROUGE-L win rate vs it. 0", "eval/eos_rate": "EOS rate",
    "eval/repeated_3gram_fraction": "repeated 3-grams", "eval/length_mean": "length",
}


def run(seeds: list[int], iterations: int, out: Path, overrides: list[str], params_file: Path) -> list[Path]:
    """Train each seed in its own worktree of HEAD; returns the run folders."""
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
    folders = []
    for seed in seeds:
        folder = out / f"seed-{seed}"
        if not folder.exists():
            out.mkdir(parents=True, exist_ok=True)
            made = subprocess.run(["git", "worktree", "add", "--detach", str(folder), "HEAD"], capture_output=True,
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
    path = folder / "metrics" / "history.csv"
    return list(csv.DictReader(path.open())) if path.exists() else []


def seed_folders(out: Path) -> dict[int, Path]:
    folders = {int(p.name.removeprefix("seed-")): p for p in sorted(out.glob("seed-*"))
               if p.name.removeprefix("seed-").isdigit() and read_history(p)}
    if not folders:
        raise StateError(f"{out}: no seed-*/metrics/history.csv (run `rlhf seeds run` first)")
    return dict(sorted(folders.items()))


def aggregate(out: Path) -> list[dict]:
    """One row per (iteration, metric) present in every seed's history: n, mean, std (ddof 1), min, max, and each
    seed's value."""
    histories = {seed: {int(r["iteration"]): r for r in read_history(folder)}
                 for seed, folder in seed_folders(out).items()}
    common = sorted(set.intersection(*(set(h) for h in histories.values())))
    rows = []
    for iteration in common:
        for key, label in METRICS.items():
            values = [histories[s][iteration].get(key) or "" for s in histories]
            if "" in values:
                continue  # a history from before this metric existed
            x = np.array([float(v) for v in values], dtype=np.float64)  # (S,)
            rows.append({"iteration": iteration, "metric": label, "n": len(x), "mean": float(x.mean()),
                         "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "min": float(x.min()),
                         "max": float(x.max()), **{f"seed {s}": float(v) for s, v in zip(histories, x)}})
    return rows


def report(out: Path) -> Path:
    rows = aggregate(out)
    seeds = [k.removeprefix("seed ") for k in rows[0] if k.startswith("seed ")] if rows else []
    with open(out / "seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["iteration"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {len(seeds)} seeds ({', '.join(seeds)}): mean ± standard deviation across seeds [min, max]", "",
             "| iteration | " + " | ".join(METRICS.values()) + " |", "|---:|" + "---|" * len(METRICS)]
    by_iteration: dict[int, dict] = {}
    for r in rows:
        by_iteration.setdefault(r["iteration"], {})[r["metric"]] = r
    for iteration, cells in by_iteration.items():
        shown = [f"{c['mean']:.4f} ± {c['std']:.4f} [{c['min']:.4f}, {c['max']:.4f}]" if (c := cells.get(m)) else "–"
                 for m in METRICS.values()]
        lines.append(f"| {iteration} | " + " | ".join(shown) + " |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    draw(rows, curves(out), out)
    log(f"seeds: {out / 'seeds.md'}, {out / 'seeds.csv'}")
    return out / "seeds.md"


def curves(out: Path) -> list[dict]:
    """Every seed's values at every iteration it reached (a seed stopped early still draws its curve)."""
    return [{"iteration": int(r["iteration"]), "metric": label, "seed": str(seed), "value": float(r[key])}
            for seed, folder in seed_folders(out).items() for r in read_history(folder)
            for key, label in METRICS.items() if r.get(key)]


def draw(rows: list[dict], points: list[dict], out: Path) -> None:
    """Every seed's curve per metric (thin) and the mean over the iterations all seeds reached (thick), as a
    Vega-Lite spec; SVG and PNG where vl-convert is installed."""
    means = [{"iteration": r["iteration"], "metric": r["metric"], "seed": "mean", "value": r["mean"]} for r in rows]
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": points + means},
        "facet": {"field": "metric", "type": "nominal", "title": None}, "columns": 4,
        "resolve": {"scale": {"y": "independent"}},
        "spec": {"width": 220, "height": 150, "mark": {"type": "line", "point": True},
                 "encoding": {"x": {"field": "iteration", "type": "quantitative", "axis": {"tickMinStep": 1}},
                              "y": {"field": "value", "type": "quantitative", "scale": {"zero": False}},
                              "color": {"field": "seed", "type": "nominal"},
                              "strokeWidth": {"condition": {"test": "datum.seed === 'mean'", "value": 3.5},
                                              "value": 1.2}}},
    }
    (out / "seeds.vl.json").write_text(json.dumps(spec, indent=1))
    try:
        import vl_convert as vlc
    except ImportError:
        log("seeds: vl-convert not installed: the curves are in seeds.vl.json only")
        return
    (out / "seeds.svg").write_text(vlc.vegalite_to_svg(spec))
    (out / "seeds.png").write_bytes(vlc.vegalite_to_png(spec, scale=1.5))


def samples(folder: Path, iteration: int, column: str) -> dict:
    """prompt_id → one per-prompt column of a run's archived held-out table; empty when absent."""
    from rlhf.evaluation import column as column_of, read_table

    values = column_of(read_table(folder / "metrics" / "samples" / f"iter-{iteration}.jsonl"), column)
    return {} if values is None else values.to_dict()


def compare(a: Path, b: Path, resamples: int = 10_000, level: float = 0.95) -> list[dict]:
    """Per iteration both folders reached and per judge: B − A paired by (seed, prompt), over the seeds both ran."""
    from rlhf.reports.statistics import bootstrap_mean

    fa, fb = seed_folders(a), seed_folders(b)
    seeds = sorted(set(fa) & set(fb))
    if not seeds:
        raise StateError(f"{a} and {b} share no seed")
    iterations = sorted(set.intersection(*(set(int(r["iteration"]) for r in read_history(f))
                                           for f in [*(fa[s] for s in seeds), *(fb[s] for s in seeds)])))
    rows = []
    for iteration in iterations:
        for column, label in (("rouge_l", "ROUGE-L"), ("reward", "reward")):
            per_seed, pooled = {}, []
            for s in seeds:
                xa, xb = samples(fa[s], iteration, column), samples(fb[s], iteration, column)
                common = sorted(set(xa) & set(xb))
                if not common or set(xa) != set(xb):
                    continue  # other held-out prompts: not paired
                d = np.array([xb[p] - xa[p] for p in common], dtype=np.float64)  # (P,)
                per_seed[s] = float(d.mean())
                pooled.extend(d.tolist())
            if not per_seed:
                continue
            mean, low, high = bootstrap_mean(pooled, resamples, 0, level)
            rows.append({"iteration": iteration, "judge": label, "seeds": len(per_seed), "delta": mean,
                         "ci_low": low, "ci_high": high, "seeds_b_ahead": sum(v > 0 for v in per_seed.values()),
                         **{f"seed {s}": v for s, v in per_seed.items()}})
    return rows


def compare_markdown(rows: list[dict], a: Path, b: Path) -> str:
    lines = [f"B = {b}, A = {a}: B − A paired by seed and held-out prompt (interval: bootstrap over the pairs)", "",
             "| iteration | judge | seeds | Δ (B − A) [interval] | seeds with B ahead | per seed |",
             "|---:|---|---:|---|---:|---|"]
    for r in rows:
        per_seed = ", ".join(f"{k.removeprefix('seed ')}: {v:+.4f}" for k, v in r.items() if k.startswith("seed "))
        lines.append(f"| {r['iteration']} | {r['judge']} | {r['seeds']} | {r['delta']:+.4f} [{r['ci_low']:+.4f}, "
                     f"{r['ci_high']:+.4f}] | {r['seeds_b_ahead']}/{r['seeds']} | {per_seed} |")
    return "\n".join(lines) + "\n"
