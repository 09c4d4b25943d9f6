"""What seed runs say together: `rlhf seeds report`, `compare` and `table` (statistics, Markdown, Vega-Lite).

Reads only the run record (rlhf/artifacts/record.py) of each `seed-<s>` folder that `rlhf seeds run` writes, so it
works on stored runs and never imports torch.

- `report` (one configuration): per iteration and held-out metric, the mean, sample standard deviation, min and max
  across seeds; the change vs iteration 0 of ROUGE-L and the reward with three intervals (below); and per seed the
  guardrails (EOS rate, share of summaries cut at the length limit, repeated 3-grams) against iteration 0.
- `compare A B`: B − A paired by seed and held-out prompt, per iteration, with the same three intervals, and per
  seed B's guardrails against A's.
- `table`: one iteration of several configurations, a row per seed (the results tables of the docs).

The three intervals of a change: the seed-level t-interval over the per-seed mean changes (n − 1 d.f.), which
treats the seeds as a sample of the seeds one could have run; the two-level bootstrap (seeds, then prompts within
each seed); and the pooled bootstrap over all (seed, prompt) pairs, which treats the seeds as fixed and is narrower.
A claim that a change holds rests on the seed-level interval.

Win rates vs iteration 0 and the cut share are computed here from the archived per-prompt tables (both sides as
archived, so identical summaries tie); the other per-seed values are the history's.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf.artifacts import record
from rlhf.errors import StateError
from rlhf.reports import statistics as st
from rlhf.runtime.log import log

RESAMPLES = 50_000  # the bounds' Monte-Carlo error is then ~0.001 on 64 prompts (eval.bootstrap_resamples' default)
LEVEL = 0.95
BOOTSTRAP_SEED = 0
CLAIM = "seed-level"  # the interval a claim rests on


@dataclass
class SeedRun:
    seed: int
    folder: Path
    history: dict[int, dict] = field(default_factory=dict)

    @property
    def metrics_dir(self) -> Path:
        return self.folder / "metrics"

    @cached_property
    def max_new_tokens(self) -> int | None:
        """The held-out summaries' length limit, from the run's params.yaml (None without one)."""
        import yaml

        path = self.folder / "params.yaml"
        raw = yaml.safe_load(path.read_text()) if path.exists() else None
        return ((raw or {}).get("eval") or {}).get("max_new_tokens")

    def table(self, iteration: int) -> pd.DataFrame | None:
        cache = self.__dict__.setdefault("_tables", {})
        if iteration not in cache:
            cache[iteration] = record.read_table(record.table_path(self.metrics_dir, iteration))
        return cache[iteration]

    def values(self, iteration: int) -> dict[str, float | None]:
        """metric name → this seed's value at `iteration` (None where not recorded)."""
        row = self.history.get(iteration, {})
        out = {m.name: record.value(row, m.key) for m in record.PER_SEED}
        now, initial = self.table(iteration), self.table(0)
        if now is not None and initial is not None and set(now.index) == set(initial.index):
            for column, name in record.WIN_RATE.items():
                a, b = record.column(now, column), record.column(initial, column)
                if a is not None and b is not None:
                    out[name] = float(st.wins(a.to_numpy(), b.reindex(a.index).to_numpy()).mean())
        if now is not None and ("cut" in now.columns or ({"eos", "length"} <= set(now.columns)
                                                         and self.max_new_tokens is not None)):
            out["cut_rate"] = record.cut_share(now, self.max_new_tokens or 0)
        return out

    def length_fit_r2(self) -> float | None:
        """R² of reward on length across iteration 0's held-out prompts: the length control's power."""
        t = self.table(0)
        if t is None or "length" not in t.columns:
            return None
        return st.least_squares_fit(t["length"].to_numpy(float), t["reward"].to_numpy(float))[1]


def seed_runs(out: Path) -> dict[int, SeedRun]:
    runs = {}
    for p in sorted(Path(out).glob("seed-*")):
        name = p.name.removeprefix("seed-")
        rows = record.read_history(p / "metrics" / "history.csv") if name.isdigit() else []
        if rows:
            runs[int(name)] = SeedRun(int(name), p, {int(r["iteration"]): r for r in rows})
    if not runs:
        raise StateError(f"{out}: no seed-*/metrics/history.csv (run `rlhf seeds run` first)")
    return dict(sorted(runs.items()))


def common_iterations(runs) -> list[int]:
    return sorted(set.intersection(*(set(r.history) for r in runs)))


# --------------------------------------------------------------------------------------------- changes


@dataclass
class Change:
    """A change (per prompt, per seed) summarised across seeds."""

    per_seed: dict[int, float]  # seed → mean change over its prompts
    seed_level: st.Interval  # t-interval over the per-seed means
    two_level: st.Interval  # bootstrap: seeds, then prompts
    pooled: st.Interval  # bootstrap over the (seed, prompt) pairs


def change(diffs: dict[int, np.ndarray], resamples: int = RESAMPLES, level: float = LEVEL) -> Change:
    """diffs: seed → per-prompt changes on the same prompts (in one prompt order)."""
    seeds = sorted(diffs)
    matrix = np.stack([diffs[s] for s in seeds])  # (S, P)
    per_seed = {s: float(diffs[s].mean()) for s in seeds}
    return Change(per_seed, st.t_interval([per_seed[s] for s in seeds], level),
                  st.two_level_bootstrap(matrix, resamples, BOOTSTRAP_SEED, level),
                  st.bootstrap_interval(matrix.ravel(), resamples, BOOTSTRAP_SEED, level))


def paired_diffs(a: pd.DataFrame | None, b: pd.DataFrame | None, column: str) -> np.ndarray | None:
    """b − a per prompt, in sorted prompt order; None when either lacks the column or they cover other prompts."""
    xa, xb = record.column(a, column), record.column(b, column)
    if xa is None or xb is None or set(xa.index) != set(xb.index):
        return None
    order = sorted(xa.index)
    return xb.reindex(order).to_numpy() - xa.reindex(order).to_numpy()  # (P,)


def show(iv: st.Interval, fmt: str = "+.4f", null: float = 0.0) -> str:
    return st.interval_text(iv, fmt, null)


# --------------------------------------------------------------------------------------------- report


def aggregate(out: Path) -> list[dict]:
    """One row per (iteration, metric) present in every seed's record: n, mean, std (ddof 1), min, max, and each
    seed's value."""
    runs = seed_runs(out)
    rows = []
    for iteration in common_iterations(runs.values()):
        values = {s: r.values(iteration) for s, r in runs.items()}
        for m in record.PER_SEED:
            got = [values[s][m.name] for s in runs]
            if None in got:
                continue  # a record from before this metric existed
            x = np.array(got, dtype=np.float64)  # (S,)
            rows.append({"iteration": iteration, "metric": m.label, "n": len(x), "mean": float(x.mean()),
                         "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0, "min": float(x.min()),
                         "max": float(x.max()), **{f"seed {s}": float(v) for s, v in zip(runs, x)}})
    return rows


def changes_vs_initial(runs: dict[int, SeedRun], resamples: int = RESAMPLES) -> list[dict]:
    """Per iteration ≥ 1 and judge: the change vs iteration 0 across seeds (only where every seed has both tables)."""
    rows = []
    for iteration in common_iterations(runs.values()):
        if iteration == 0:
            continue
        for column, label in record.JUDGES.items():
            diffs = {s: paired_diffs(r.table(0), r.table(iteration), column) for s, r in runs.items()}
            if any(d is None for d in diffs.values()):
                continue
            per_seed = {s: st.bootstrap_interval(d, resamples, BOOTSTRAP_SEED, LEVEL) for s, d in diffs.items()}
            rows.append({"iteration": iteration, "judge": label, "change": change(diffs, resamples),
                         "seed_intervals": per_seed})
    return rows


def guardrail_rows(before: dict[int, dict], after: dict[int, dict]) -> list[dict]:
    """Per seed: each guardrail's value before and after and whether it is worse by its tolerance."""
    rows = []
    for s in sorted(set(before) & set(after)):
        cells = {}
        for m in record.GUARDRAILS:
            x, y = before[s].get(m.name), after[s].get(m.name)
            cells[m.name] = None if x is None or y is None else (x, y, m.guardrail_worse(x, y))
        rows.append({"seed": s, **cells})
    return rows


GUARDRAIL_RULE = ", ".join(f"{m.label} {'lower' if m.worse < 0 else 'higher'} by more than {m.tolerance:g}"
                           for m in record.GUARDRAILS)


def guardrail_markdown(rows_by_iteration: dict[int, list[dict]], before: str, after: str) -> list[str]:
    heads = " | ".join(f"{m.label}: {before} → {after} (Δ)" for m in record.GUARDRAILS)
    lines = [f"| iteration | seed | {heads} | worse |", "|---:|---:|" + "---|" * len(record.GUARDRAILS) + "---|"]
    for iteration, rows in rows_by_iteration.items():
        for r in rows:
            cells, worse = [], []
            for m in record.GUARDRAILS:
                got = r[m.name]
                if got is None:
                    cells.append("–")
                    continue
                x, y, bad = got
                cells.append(f"{x:.3f} → {y:.3f} ({y - x:+.3f})")  # 3 decimals: 1/64 steps beside 0.05 limits
                if bad:
                    worse.append(m.label)
            lines.append(f"| {iteration} | {r['seed']} | " + " | ".join(cells) + f" | {', '.join(worse) or 'no'} |")
    return lines


def report(out: Path, resamples: int = RESAMPLES) -> Path:
    runs = seed_runs(out)
    rows = aggregate(out)
    seeds = [str(s) for s in runs]
    with open(out / "seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["iteration"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    labels = [m.label for m in record.PER_SEED]
    lines = [f"# {len(seeds)} seeds ({', '.join(seeds)}): mean ± standard deviation across seeds [min, max]", "",
             "| iteration | " + " | ".join(labels) + " |", "|---:|" + "---|" * len(labels)]
    by_iteration: dict[int, dict] = {}
    for r in rows:
        by_iteration.setdefault(r["iteration"], {})[r["metric"]] = r
    for iteration, cells in by_iteration.items():
        shown = [f"{c['mean']:.4f} ± {c['std']:.4f} [{c['min']:.4f}, {c['max']:.4f}]" if (c := cells.get(m)) else "–"
                 for m in labels]
        lines.append(f"| {iteration} | " + " | ".join(shown) + " |")
    changes = changes_vs_initial(runs, resamples)
    if changes:
        lines += ["", f"## Change vs iteration 0 ({LEVEL:.0%} intervals; a claim rests on the {CLAIM} one)", "",
                  "| iteration | judge | mean Δ | seed-level (t over seeds) | two-level bootstrap | pooled bootstrap | "
                  "per seed Δ [bootstrap over prompts] |", "|---:|---|---:|---|---|---|---|"]
        for r in changes:
            c = r["change"]
            per = ", ".join(f"{s}: {show(iv)}" for s, iv in r["seed_intervals"].items())
            lines.append(f"| {r['iteration']} | {r['judge']} | {c.seed_level.mean:+.4f} | {show(c.seed_level)} | "
                         f"{show(c.two_level)} | {show(c.pooled)} | {per} |")
    initial = {s: r.values(0) for s, r in runs.items()} if all(0 in r.history for r in runs.values()) else None
    if initial:
        guard = {it: guardrail_rows(initial, {s: r.values(it) for s, r in runs.items()})
                 for it in common_iterations(runs.values()) if it > 0}
        lines += ["", f"## Guardrails vs iteration 0, per seed (worse: {GUARDRAIL_RULE})", "",
                  *guardrail_markdown(guard, "it. 0", "it. N")]
    r2 = {s: r.length_fit_r2() for s, r in runs.items()}
    if all(v is not None for v in r2.values()):
        lines += ["", "Length control: R² of reward on length across iteration 0's held-out prompts "
                  + ", ".join(f"{s}: {v:.3f}" for s, v in r2.items())
                  + " (near 0, the length-adjusted Δ equals the raw one by construction and is no evidence)."]
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    draw(rows, curves(runs), out)
    log(f"seeds: {out / 'seeds.md'}, {out / 'seeds.csv'}")
    return out / "seeds.md"


def curves(runs: dict[int, SeedRun]) -> list[dict]:
    """Every seed's values at every iteration it reached (a seed stopped early still draws its curve)."""
    return [{"iteration": it, "metric": m.label, "seed": str(s), "value": v}
            for s, r in runs.items() for it in sorted(r.history) for m in record.PER_SEED
            if (v := r.values(it)[m.name]) is not None]


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


# --------------------------------------------------------------------------------------------- compare


def compare(a: Path, b: Path, resamples: int = RESAMPLES) -> dict:
    """Per iteration both folders reached and per judge: B − A paired by (seed, prompt), over the seeds both ran;
    and per iteration and seed, B's guardrails against A's."""
    ra, rb = seed_runs(a), seed_runs(b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        raise StateError(f"{a} and {b} share no seed")
    iterations = common_iterations([*(ra[s] for s in seeds), *(rb[s] for s in seeds)])
    rows, guard = [], {}
    for iteration in iterations:
        for column, label in record.JUDGES.items():
            diffs = {s: d for s in seeds
                     if (d := paired_diffs(ra[s].table(iteration), rb[s].table(iteration), column)) is not None}
            if diffs:  # a seed judged on other prompts is not paired: left out
                c = change(diffs, resamples)
                rows.append({"iteration": iteration, "judge": label, "seeds": len(diffs), "change": c,
                             "seeds_b_ahead": sum(v > 0 for v in c.per_seed.values())})
        guard[iteration] = guardrail_rows({s: ra[s].values(iteration) for s in seeds},
                                          {s: rb[s].values(iteration) for s in seeds})
    return {"rows": rows, "guardrails": guard}


def worse_seeds(guard_rows: list[dict]) -> int:
    return sum(any(r[m.name] is not None and r[m.name][2] for m in record.GUARDRAILS) for r in guard_rows)


def compare_markdown(result: dict, a: Path, b: Path) -> str:
    rows, guard = result["rows"], result["guardrails"]
    lines = [f"B = {b}, A = {a}: B − A paired by seed and held-out prompt, {LEVEL:.0%} intervals. A claim rests on "
             f"the {CLAIM} interval (t over the per-seed means); the two-level bootstrap (seeds, then prompts) and "
             "the pooled bootstrap over the (seed, prompt) pairs, which treats the seeds as fixed, are shown beside "
             "it. \"borderline\": a bound within its Monte-Carlo error of 0.", "",
             "| iteration | judge | seeds | Δ (B − A) | seed-level (t) | two-level bootstrap | pooled bootstrap | "
             "seeds with B ahead | per seed |", "|---:|---|---:|---:|---|---|---|---:|---|"]
    for r in rows:
        c = r["change"]
        per = ", ".join(f"{s}: {v:+.4f}" for s, v in c.per_seed.items())
        lines.append(f"| {r['iteration']} | {r['judge']} | {r['seeds']} | {c.pooled.mean:+.4f} | {show(c.seed_level)} "
                     f"| {show(c.two_level)} | {show(c.pooled)} | {r['seeds_b_ahead']}/{r['seeds']} | {per} |")
    lines += ["", f"Guardrails, B against A per seed (worse: {GUARDRAIL_RULE}):", "",
              *guardrail_markdown(guard, "A", "B"), "",
              "Per iteration: the seed-level interval of B − A on ROUGE-L, and the seeds where any of B's guardrails "
              "is worse:", "", "| iteration | ROUGE-L seed-level interval | entirely above 0 | seeds with a guardrail "
              "worse |", "|---:|---|---|---:|"]
    for iteration, guard_rows in guard.items():
        rouge = next((r["change"].seed_level for r in rows if r["iteration"] == iteration and r["judge"] == "ROUGE-L"),
                     None)
        above = "–" if rouge is None or math.isnan(rouge.low) else ("yes" if rouge.low > 0 else "no")
        lines.append(f"| {iteration} | {'–' if rouge is None else show(rouge)} | {above} | "
                     f"{worse_seeds(guard_rows)} of {len(guard_rows)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- results tables


def results_table(folders: dict[str, Path], iteration: int, detail: bool = False,
                  resamples: int = RESAMPLES) -> str:
    """Iteration `iteration` of each configuration, one row per seed, then each configuration's seed-level mean
    change; iteration 0's values (the mean over every seed's iteration 0) on top. Intervals: per seed a bootstrap
    over the held-out prompts, per configuration the seed-level t-interval. detail: also the win rates, the
    length-adjusted reward change with its fit's R², repeated 3-grams and KL."""
    runs = {name: seed_runs(folder) for name, folder in folders.items()}
    judges = ["reward", "rouge_l"]
    head = ["run", "seed", "reward", "Δ reward vs it. 0 [95%]", "ROUGE-L", "Δ ROUGE-L vs it. 0 [95%]"]
    if detail:
        head += ["win rate vs it. 0", "ROUGE-L win rate vs it. 0", "length-adjusted Δ reward (R² at it. 0)"]
    head += ["EOS rate", "cut at the length limit", "length"] + (["repeated 3-grams", "KL"] if detail else [])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]

    def level_cells(values: list[dict], keys: list[str]) -> list[str]:
        out = []
        for k in keys:
            got = [v[k] for v in values if v.get(k) is not None]
            out.append(format(float(np.mean(got)), record.METRICS[k].fmt) if len(got) == len(values) else "–")
        return out

    all_initial = [r.values(0) | {"kl_mean": record.value(r.history.get(0, {}), "eval/kl_mean")}
                   for rs in runs.values() for r in rs.values()]
    first = level_cells(all_initial, ["reward_mean"]) + ["—"] + level_cells(all_initial, ["rouge_l_mean"]) + ["—"]
    if detail:
        first += ["—", "—", "—"]
    first += level_cells(all_initial, ["eos_rate", "cut_rate", "length_mean"])
    if detail:
        first += level_cells(all_initial, ["repeated_3gram_fraction", "kl_mean"])
    lines.append("| (iteration 0) | all | " + " | ".join(first) + " |")
    for name, rs in runs.items():
        diffs: dict[str, dict[int, np.ndarray]] = {j: {} for j in judges}
        for s, r in rs.items():
            if iteration not in r.history:
                raise StateError(f"{r.folder}: no iteration {iteration}")
            v = r.values(iteration) | {"kl_mean": record.value(r.history[iteration], "eval/kl_mean")}
            cells = []
            for j in judges:
                d = paired_diffs(r.table(0), r.table(iteration), j)
                cells += level_cells([v], [f"{j}_mean"])
                if d is None:
                    cells.append("–")
                else:
                    diffs[j][s] = d
                    cells.append(show(st.bootstrap_interval(d, resamples, BOOTSTRAP_SEED, LEVEL)))
            if detail:
                cells += level_cells([v], ["win_rate_vs_initial", "rouge_l_win_rate_vs_initial"])
                cells.append(length_adjusted(r, iteration, resamples))
            cells += level_cells([v], ["eos_rate", "cut_rate", "length_mean"])
            if detail:
                cells += level_cells([v], ["repeated_3gram_fraction", "kl_mean"])
            lines.append(f"| {name} | {s} | " + " | ".join(cells) + " |")
        cells = []
        for j in judges:
            complete = len(diffs[j]) == len(rs)
            cells += ["", show(st.t_interval([d.mean() for d in diffs[j].values()], LEVEL)) if complete else "–"]
        cells += [""] * (len(head) - 2 - len(cells))
        lines.append(f"| {name} | mean (seed-level) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def length_adjusted(r: SeedRun, iteration: int, resamples: int) -> str:
    t0, t = r.table(0), r.table(iteration)
    d_reward, d_length = paired_diffs(t0, t, "reward"), paired_diffs(t0, t, "length")
    if d_reward is None or d_length is None:
        return "–"
    order = sorted(t0.index)
    slope, r2 = st.least_squares_fit(t0["length"].reindex(order).to_numpy(float),
                                     t0["reward"].reindex(order).to_numpy(float))
    iv = st.bootstrap_interval(d_reward - slope * d_length, resamples, BOOTSTRAP_SEED, LEVEL)
    return f"{show(iv)} ({r2:.3f})"
