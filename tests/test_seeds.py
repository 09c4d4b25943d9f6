"""`rlhf seeds run | report | compare | table`: one configuration under several seeds, and what the seeds say
together.

`run` end to end on a tiny project (2 seeds × 1 iteration, then one seed continued); `report` and `compare` on
hand-written seed folders against naive float64 loops, and on constructed seeds where the pooled and the seed-level
intervals disagree; the published tables rebuilt from the stored runs byte for byte; every bad input refused with
one line and exit code 2, before any worktree is made.
"""

import csv
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT, cli_without_torch, make_project, run, tiny_params
from rlhf.artifacts import record
from rlhf.config.params import parse_params
from rlhf.reports import blocks
from rlhf.reports import seeds as sd
from rlhf.reports import statistics as st

METRICS = {m.key: m.label for m in record.PER_SEED}  # history.csv column → the report's label

# --------------------------------------------------------------------------------------------- run, end to end


def worktrees(repo: Path) -> list[Path]:
    out = run(["git", "worktree", "list", "--porcelain"], repo).stdout
    return [Path(line.split(" ", 1)[1]).resolve() for line in out.splitlines() if line.startswith("worktree ")]


def history(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "metrics" / "history.csv").open()))


@pytest.mark.slow
def test_seeds_run_trains_each_seed_in_its_worktree_continues_and_reports(tmp_path, tiny_policy, tiny_reward):
    """The working tree's params.yaml (not HEAD's) with `seed` and --set applied in each seed's worktree; one
    iteration each; then seed 3 asked for 2 iterations continues its run (iterations 0 and 1 kept, one more trained)
    instead of starting over; seeds.csv/.md hold n, mean, std (ddof 1), min, max across seeds of each history
    column, recomputed here in float64."""
    committed = tiny_params(tiny_policy, tiny_reward, ppo={"epochs": 1, "num_minibatches": 1})
    repo = make_project(tmp_path / "repo", committed)
    working = {**committed, "eval": {**committed["eval"], "max_new_tokens": 4}}  # not committed: must be used
    (repo / "params.yaml").write_text(yaml.safe_dump(working, sort_keys=False))
    overrides = ["optim.lr=2.0e-4", "kl.coef=0.07"]
    set_args = [a for o in overrides for a in ("--set", o)]
    run(["nice", "-n", "5", "rlhf", "seeds", "run", "-s", "3", "-s", "5", "-n", "1", *set_args], repo)

    out = repo / "runs" / "seeds"
    folders = {s: out / f"seed-{s}" for s in (3, 5)}
    assert set(worktrees(repo)) == {repo.resolve(), *(f.resolve() for f in folders.values())}
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    for seed, folder in folders.items():
        assert run(["git", "rev-parse", "HEAD"], folder).stdout.strip() == head
        expected = json.loads(json.dumps(working))
        expected.update(seed=seed)
        expected["optim"]["lr"], expected["kl"]["coef"] = 2.0e-4, 0.07
        assert parse_params(yaml.safe_load((folder / "params.yaml").read_text())) == parse_params(expected), seed
        assert [r["iteration"] for r in history(folder)] == ["0", "1"], seed
        assert json.loads((folder / "models/current/state.json").read_text())["iteration"] == 1
    # the same held-out prompts under both seeds (data.split_seed, not seed), so the seeds are paired
    import pandas as pd

    held_out = [sorted(pd.read_parquet(f / "data/prepared/eval.parquet")["prompt_id"]) for f in folders.values()]
    assert held_out[0] == held_out[1]

    check_report(out, folders)
    assert (out / "seeds.vl.json").exists()
    try:
        import vl_convert  # noqa: F401
    except ImportError:
        pass
    else:
        assert (out / "seeds.svg").read_text().lstrip().startswith("<svg")
        assert (out / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # continue seed 3 to 2 iterations: its worktree, first iterations and log are kept
    (folders[3] / "marker").write_text("kept")
    first_rows, first_log = history(folders[3]), (folders[3] / "train.log").read_text()
    seed5_rows = history(folders[5])
    run(["nice", "-n", "5", "rlhf", "seeds", "run", "-s", "3", "-n", "2", *set_args], repo)
    rows = history(folders[3])
    assert [r["iteration"] for r in rows] == ["0", "1", "2"]
    assert rows[:2] == first_rows
    assert (folders[3] / "marker").read_text() == "kept"
    assert (folders[3] / "train.log").read_text().startswith(first_log)
    assert json.loads((folders[3] / "models/current/state.json").read_text())["iteration"] == 2
    assert history(folders[5]) == seed5_rows
    check_report(out, folders)  # iterations 0 and 1, the ones both seeds have


def check_report(out: Path, folders: dict[int, Path]) -> None:
    histories = {s: {int(r["iteration"]): r for r in history(f)} for s, f in folders.items()}
    common = sorted(set.intersection(*(set(h) for h in histories.values())))
    rows = list(csv.DictReader((out / "seeds.csv").open()))
    expected = naive_aggregate(histories, common)
    assert [(int(r["iteration"]), r["metric"]) for r in rows] == [k for k in expected]
    assert len(rows) >= 2 * 5  # reward, ROUGE-L, win rate, EOS, repetition at least, per iteration
    for r in rows:
        want = expected[(int(r["iteration"]), r["metric"])]
        assert int(r["n"]) == want["n"] == len(folders)
        for key in ("mean", "std", "min", "max", *(f"seed {s}" for s in folders)):
            assert float(r[key]) == pytest.approx(want[key], rel=1e-12, abs=1e-15), (r["metric"], key)
    md = (out / "seeds.md").read_text()
    assert md.startswith(f"# {len(folders)} seeds ({', '.join(str(s) for s in folders)})")
    for iteration in common:
        want = expected[(iteration, "reward")]
        assert f"| {iteration} | {want['mean']:.4f} ± {want['std']:.4f} [{want['min']:.4f}, {want['max']:.4f}] |" in md


def naive_aggregate(histories: dict[int, dict], iterations: list[int]) -> dict:
    """(iteration, label) → n, mean, sample std, min, max and each seed's value, by plain float64 loops."""
    expected = {}
    for iteration in iterations:
        for column, label in METRICS.items():
            values = [histories[s][iteration].get(column, "") for s in histories]
            if any(v in ("", None) for v in values):
                continue
            xs = [float(v) for v in values]
            mean = math.fsum(xs) / len(xs)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
            expected[(iteration, label)] = {"n": len(xs), "mean": mean, "std": std, "min": min(xs), "max": max(xs),
                                            **{f"seed {s}": x for s, x in zip(histories, xs)}}
    return expected


# --------------------------------------------------------------------------------------------- report, compare


def write_history(folder: Path, rows: list[dict]) -> None:
    (folder / "metrics").mkdir(parents=True, exist_ok=True)
    columns = ["iteration", *METRICS, "eval/kl_to_reference"]
    with open(folder / "metrics" / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in columns} for r in rows)


def random_history(gen: np.random.Generator, iterations: int) -> list[dict]:
    return [{"iteration": i, **{c: repr(float(gen.normal(0.3, 0.2))) for c in METRICS},
             "eval/kl_to_reference": repr(float(gen.random()))} for i in range(iterations)]


def test_report_is_mean_and_spread_per_iteration_over_the_seeds(tmp_path):
    """Three seeds, one with an iteration more (left out: not every seed reached it), one history missing a column
    at one iteration (that cell left out, the rest kept), and a folder that is no seed run (ignored)."""
    gen = np.random.default_rng(0)
    folders = {7: tmp_path / "seed-7", 11: tmp_path / "seed-11", 42: tmp_path / "seed-42"}
    histories = {7: random_history(gen, 3), 11: random_history(gen, 4), 42: random_history(gen, 3)}
    histories[42][1]["eval/rouge_l_mean"] = ""  # a history from before ROUGE
    for s, rows in histories.items():
        write_history(folders[s], rows)
    write_history(tmp_path / "seed-x", random_history(gen, 3))
    (tmp_path / "seed-9").mkdir()  # no history yet

    result = run(["rlhf", "seeds", "report", str(tmp_path)], tmp_path)
    expected = naive_aggregate({s: {int(r["iteration"]): r for r in rows} for s, rows in sorted(histories.items())},
                               [0, 1, 2])
    assert (1, "ROUGE-L") not in expected and (0, "ROUGE-L") in expected and len(expected) == 3 * len(METRICS) - 1
    rows = list(csv.DictReader((tmp_path / "seeds.csv").open()))
    assert [(int(r["iteration"]), r["metric"]) for r in rows] == list(expected)
    for r in rows:
        want = expected[(int(r["iteration"]), r["metric"])]
        assert int(r["n"]) == 3
        for key in ("mean", "std", "min", "max", "seed 7", "seed 11", "seed 42"):
            assert float(r[key]) == pytest.approx(want[key], rel=1e-12, abs=1e-15), (r["iteration"], r["metric"], key)
    md = (tmp_path / "seeds.md").read_text()
    assert md.startswith("# 3 seeds (7, 11, 42)") and result.stdout.strip() == md.strip()
    first_table = md.split("\n\n")[1].splitlines()
    assert [line.split("|")[1].strip() for line in first_table[2:]] == ["0", "1", "2"]
    spec = json.loads((tmp_path / "seeds.vl.json").read_text())
    curve = {(v["seed"], v["iteration"], v["metric"]): v["value"] for v in spec["data"]["values"]}
    for (iteration, label), want in expected.items():
        assert curve[("mean", iteration, label)] == pytest.approx(want["mean"], rel=1e-12)
        for s in folders:
            assert curve[(str(s), iteration, label)] == pytest.approx(want[f"seed {s}"], rel=1e-12)


def write_samples(folder: Path, iteration: int, values: dict[int, tuple[float, float]], shuffle: int | None) -> None:
    rows = [{"prompt_id": p, "summary": f"s{p}", "reward": r, "rouge_l": q} for p, (r, q) in values.items()]
    if shuffle is not None:
        random.Random(shuffle).shuffle(rows)
    path = folder / "metrics" / "samples" / f"iter-{iteration}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


PUBLISHED = Path(__file__).resolve().parents[1] / "docs" / "runs" / "seeds-2026-12-06"


def published_tables(tmp_path: Path) -> dict[str, str]:
    """Every published table rebuilt from copies of the stored runs by the commands docs/results.md names."""
    docs = ROOT / "docs" / "runs" / "seeds-2026-12-06"
    for name in ("moments-carried", "moments-reset"):
        shutil.copytree(PUBLISHED / name, tmp_path / docs.relative_to(ROOT) / name,
                        ignore=shutil.ignore_patterns("seeds.*"))
    study = Path("docs/runs/moments-2026-12-07")  # the pre-registered study's runs
    shutil.copytree(ROOT / study, tmp_path / study, ignore=shutil.ignore_patterns("seeds.*"))
    study_a, study_b = str(study / "carried"), str(study / "reset")
    lever = Path("docs/runs/minibatches-2026-12-07/minibatches-4")  # the minibatches study's B (its A is study_a)
    shutil.copytree(ROOT / lever, tmp_path / lever, ignore=shutil.ignore_patterns("seeds.*"))
    for name in ("README.md", "docs/results.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    printed = {page: printed_commands((ROOT / page).read_text()) for page in pages_printing_commands()}
    table_commands = [c for commands in printed.values() for c in commands]
    # what the printed commands read and write: run folders, per-prompt tables, the pages, bench/paired_eval.py
    for name in sorted({a for c in table_commands for a in c if a.startswith(("docs/", "bench/"))}):
        source, copy = ROOT / name, tmp_path / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, dirs_exist_ok=True)
        else:
            shutil.copy2(source, copy)
    folder = docs.relative_to(ROOT)
    carried, reset = str(folder / "moments-carried"), str(folder / "moments-reset")
    for command in (["rlhf", "seeds", "report", carried], ["rlhf", "seeds", "report", reset],
                    ["rlhf", "seeds", "compare", carried, reset, "--out", str(folder / "compare.md")],
                    ["rlhf", "seeds", "table", carried, reset, "-n", "4", "--detail", "--into", "docs/results.md",
                     "--block", "seeds-table"],
                    ["rlhf", "seeds", "report", study_a], ["rlhf", "seeds", "report", study_b],
                    ["rlhf", "seeds", "table", study_a, study_b, "-n", "4", "--into", "README.md"],
                    ["rlhf", "seeds", "table", study_a, study_b, "-n", "4", "--detail", "--into", "docs/results.md",
                     "--block", "study-table"],
                    ["rlhf", "seeds", "compare", study_a, study_b, "--into", "docs/results.md", "--block",
                     "study-compare"],
                    ["rlhf", "seeds", "report", str(lever)],
                    ["rlhf", "seeds", "table", study_a, str(lever), "-n", "4", "--detail", "--into",
                     "docs/results.md", "--block", "minibatches-table"],
                    ["rlhf", "seeds", "compare", study_a, str(lever), "--into", "docs/results.md", "--block",
                     "minibatches-compare"], *table_commands):
        run(command, tmp_path)
    return {str(where / table): (tmp_path / where / table).read_text()
            for where in (folder / "moments-carried", folder / "moments-reset", study / "carried", study / "reset",
                          lever)
            for table in ("seeds.md", "seeds.csv")} | {
        str(folder / "compare.md"): (tmp_path / folder / "compare.md").read_text(),
        "README.md": (tmp_path / "README.md").read_text()} | {
        page: (tmp_path / page).read_text() for page in printed}


# the blocks each page's printed commands write: every table of the single runs under docs/runs
PRINTED_BLOCKS = {
    "docs/results.md": {"default-4-table", "default-20-table", "levers-table", "lever-sweep-table"},
    "docs/runs/embedded-default-2026-11-30/README.md": {"default-4-table"},
    "docs/runs/embedded-long-2026-11-30/README.md": {"default-20-table"},
    "docs/runs/sft-warm-start-2026-11-30/README.md": {"sft-table", "sft-vs-base-table"},
}
TABLE_COMMANDS = ("rlhf history table ", "python bench/paired_eval.py ")  # the commands that print a run's table


def pages_printing_commands() -> list[str]:
    """docs/results.md and every run folder's README under docs/runs that prints a table command."""
    pages = ["docs/results.md", *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs/runs").glob("*/README.md")))]
    return [page for page in pages if printed_commands((ROOT / page).read_text())]


def printed_commands(page: str) -> list[list[str]]:
    """The table commands (`TABLE_COMMANDS`) a page prints in its indented code blocks (continuation lines joined),
    so the commands a reader sees are the ones that rebuild the tables below them."""
    import shlex

    commands, current = [], ""
    for line in page.splitlines():
        text = line.strip()
        if current or text.startswith(TABLE_COMMANDS):
            current += " " + text.removesuffix("\\")
            if not text.endswith("\\"):
                commands.append(shlex.split(current))
                current = ""
    return commands


def test_the_published_seed_runs_give_back_their_published_tables(tmp_path):
    """docs/runs keeps each seed run in the layout `rlhf seeds run` writes, so `report`, `compare` and `table` on
    those folders rebuild the published seeds.md/.csv, compare.md and the results tables of README.md and
    docs/results.md byte for byte, and the commands docs/results.md and the run folders' READMEs print (`rlhf history
    table`, `bench/paired_eval.py`) rebuild the single runs' tables from their stored history.csv and held-out
    tables: no number in them is typed by hand."""
    rebuilt = published_tables(tmp_path)
    for name, text in rebuilt.items():
        assert text == (ROOT / name).read_text(), name
    readme, results = (ROOT / "README.md").read_text(), (ROOT / "docs/results.md").read_text()
    # the blocks are there and hold the tables: the study's five seeds and their mean per setting
    assert blocks.block(readme, "results-table").count("| carried |") == blocks.block(readme, "results-table").count(
        "| reset |") == 6
    assert blocks.block(results, "study-table").count("| carried |") == 6
    assert blocks.block(results, "seeds-table").count("| moments-") == 8
    assert "| 4 | ROUGE-L | 5 |" in blocks.block(results, "study-compare")
    assert "| 4 | ROUGE-L | 5 |" in blocks.block(results, "minibatches-compare")
    assert blocks.block(results, "minibatches-table").count("| minibatches-4 |") == 6
    # every table of the single runs under docs/runs is a block written by the command printed above it, into the
    # page that prints it
    assert set(pages_printing_commands()) == set(PRINTED_BLOCKS)
    for page, names in PRINTED_BLOCKS.items():
        text = (ROOT / page).read_text()
        printed = printed_commands(text)
        assert all(c[c.index("--into") + 1] == page for c in printed), page
        assert {c[c.index("--block") + 1] for c in printed} == names and len(printed) == len(names), page
        for name in names:
            assert blocks.block(text, name).count("\n| ") >= 2, (page, name)  # the block holds a table with rows


def test_compare_pairs_by_seed_and_prompt(tmp_path):
    """A ran seeds 1, 2, 3 and B seeds 2, 3, 4: seeds 2 and 3 are compared. B's sample rows are shuffled (pairing is by
    prompt id, not row). At iteration 1 seed 3's B was judged on other prompts: that seed is left out there. B is
    ahead on seed 2 and behind on seed 3 at iteration 0. The pooled Δ and its interval are bootstrap_mean over the
    (seed, prompt) differences in seed then prompt order, per seed the mean difference."""
    gen = np.random.default_rng(1)
    a, b = tmp_path / "a", tmp_path / "b"
    prompts = list(range(100, 112))
    table: dict = {}
    for side, seeds, shuffle in ((a, (1, 2, 3), None), (b, (2, 3, 4), 5)):
        for s in seeds:
            write_history(side / f"seed-{s}", random_history(gen, 3 if s != 3 else 2))  # seed 3: iterations 0, 1
            for iteration in (0, 1, 2):
                shift = {(b, 2): 0.3, (b, 3): -0.3}.get((side, s), 0.0) if iteration == 0 else 0.0
                ids = prompts if not (side == b and s == 3 and iteration == 1) else prompts[1:] + [999]
                values = {p: (float(gen.normal(shift, 0.5)), float(gen.random())) for p in ids}
                table[(side, s, iteration)] = values
                write_samples(side / f"seed-{s}", iteration, values, shuffle)

    result = sd.compare(a, b)
    got = {(r["iteration"], r["judge"]): r for r in result["rows"]}
    assert list(got) == [(0, "ROUGE-L"), (0, "reward"), (1, "ROUGE-L"), (1, "reward")]  # seed 3 stops at 1
    for (iteration, judge), r in got.items():
        column = 1 if judge == "ROUGE-L" else 0
        paired = [2, 3] if iteration == 0 else [2]
        pooled, per_seed = [], {}
        for s in paired:
            xa, xb = table[(a, s, iteration)], table[(b, s, iteration)]
            d = [xb[p][column] - xa[p][column] for p in sorted(xa)]
            per_seed[s] = math.fsum(d) / len(d)
            pooled.extend(d)
        c = r["change"]
        assert r["seeds"] == len(paired) and list(c.per_seed) == paired
        for s in paired:
            assert c.per_seed[s] == pytest.approx(per_seed[s], rel=1e-12, abs=1e-15)
        assert c.pooled.mean == pytest.approx(math.fsum(pooled) / len(pooled), rel=1e-12, abs=1e-15)
        assert c.pooled[:3] == pytest.approx(st.bootstrap_mean(pooled, sd.RESAMPLES, 0, 0.95), rel=1e-12, abs=1e-15)
        if len(paired) == 2:  # mean ± t(0.975, 1 d.f.) · s / √2 over the two per-seed means
            m = (per_seed[2] + per_seed[3]) / 2
            half = 12.706204736 * abs(per_seed[2] - per_seed[3]) / math.sqrt(2) / math.sqrt(2)
            assert c.seed_level[:3] == pytest.approx((m, m - half, m + half), rel=1e-8)
        assert r["seeds_b_ahead"] == sum(v > 0 for v in per_seed.values())
    r0 = got[(0, "reward")]["change"]
    assert got[(0, "reward")]["seeds_b_ahead"] == 1 and r0.per_seed[2] > 0 > r0.per_seed[3]

    # the same result whatever the row order of A's tables too
    for s in (1, 2, 3):
        for iteration in (0, 1, 2):
            write_samples(a / f"seed-{s}", iteration, table[(a, s, iteration)], shuffle=17 + s)
    assert sd.compare(a, b) == result

    text = run(["rlhf", "seeds", "compare", str(a), str(b), "--out", str(tmp_path / "cmp.md")], tmp_path).stdout
    line = (f"| 0 | reward | 2 | {r0.pooled.mean:+.4f} | {sd.show(r0.seed_level)} | {sd.show(r0.two_level)} | "
            f"{sd.show(r0.pooled)} | 1/2 | 2: {r0.per_seed[2]:+.4f}, 3: {r0.per_seed[3]:+.4f} |")
    assert line in text and line in (tmp_path / "cmp.md").read_text()


def write_run(folder: Path, tables: dict[int, dict[int, dict]], history_rows: list[dict] | None = None,
              max_new_tokens: int = 8) -> None:
    """A seed folder as `rlhf seeds run` leaves it: params.yaml (its eval.max_new_tokens), history.csv and one
    held-out table per iteration ({iteration: {prompt: row}})."""
    (folder / "metrics" / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump({"eval": {"max_new_tokens": max_new_tokens}}))
    rows = history_rows or [{"iteration": i} for i in tables]
    write_history(folder, rows)
    for iteration, by_prompt in tables.items():
        record.write_table(__import__("pandas").DataFrame([{"prompt_id": p, **r} for p, r in by_prompt.items()]),
                           record.table_path(folder / "metrics", iteration))


def test_pooled_and_seed_level_intervals_disagree_and_the_claim_rests_on_the_seed_level_one(tmp_path):
    """Three seeds whose B − A is nearly constant within a seed (+0.05, +0.06, −0.03, spread 0.005 over 64 prompts):
    the pooled bootstrap over the 192 (seed, prompt) pairs lies above 0, but three seed means that far apart give a
    seed-level t-interval (2 d.f.) across 0; compare prints both and says the claim rests on the seed-level one."""
    gen = np.random.default_rng(4)
    a, b = tmp_path / "a", tmp_path / "b"
    shifts = {1: 0.05, 2: 0.06, 3: -0.03}
    for s, shift in shifts.items():
        base = {p: float(x) for p, x in enumerate(gen.uniform(0.1, 0.4, 64))}
        for side, add in ((a, 0.0), (b, shift)):
            tables = {it: {p: {"reward": v + add + (float(gen.normal(0, 0.005)) if side == b else 0.0),
                               "rouge_l": v + add + (float(gen.normal(0, 0.005)) if side == b else 0.0)}
                           for p, v in base.items()} for it in (0, 1)}
            write_run(side / f"seed-{s}", tables)
    result = sd.compare(a, b)
    r = next(r for r in result["rows"] if r["iteration"] == 1 and r["judge"] == "ROUGE-L")["change"]
    means = [r.per_seed[s] for s in (1, 2, 3)]
    assert means == pytest.approx(list(shifts.values()), abs=0.003)
    assert r.pooled.low > 0  # pooled: "B is better"
    m, sdev = float(np.mean(means)), float(np.std(means, ddof=1))
    half = 4.302652730 * sdev / math.sqrt(3)  # t(0.975, 2 d.f.)
    assert r.seed_level[:3] == pytest.approx((m, m - half, m + half), rel=1e-8)
    assert r.seed_level.low < 0 < r.seed_level.high  # seed level: not shown
    assert r.two_level.low < 0 < r.two_level.high
    text = sd.compare_markdown(result, a, b)
    assert "A claim rests on the seed-level interval" in text
    assert f"| 1 | {sd.show(r.seed_level)} | no | 0 of 3 |" in text  # the decision inputs: not above 0

    # the same disagreement in `report`, for the change vs iteration 0 of one configuration
    for s, shift in shifts.items():
        t0 = record.read_table(record.table_path(a / f"seed-{s}" / "metrics", 0))
        tables = {0: {p: dict(row) for p, row in t0.to_dict("index").items()},
                  1: {p: {k: v + shift + float(gen.normal(0, 0.005)) for k, v in row.items()}
                      for p, row in t0.to_dict("index").items()}}
        write_run(tmp_path / "one" / f"seed-{s}", tables)
    md = (tmp_path / "one" / "seeds.md").read_text() if sd.report(tmp_path / "one") else ""
    runs = sd.seed_runs(tmp_path / "one")
    c = next(r for r in sd.changes_vs_initial(runs) if r["judge"] == "ROUGE-L")["change"]
    assert c.pooled.low > 0 and c.seed_level.low < 0 < c.seed_level.high
    assert f"| 1 | ROUGE-L | {c.seed_level.mean:+.4f} | {sd.show(c.seed_level)} | {sd.show(c.two_level)} | " \
           f"{sd.show(c.pooled)} |" in md
    assert "a claim rests on the seed-level one" in md


def test_guardrails_per_seed_by_the_protocol_thresholds(tmp_path):
    """B against A per seed: EOS rate lower by more than 0.05, share cut at the length limit (no EOS and
    eval.max_new_tokens tokens, read from the run's params.yaml) higher by more than 0.05, repeated 3-grams higher by
    more than 0.02 make a seed's guardrail worse; changes at or inside those do not."""
    n = 40
    def tables(eos_off: int, long: int) -> dict:
        """eos_off prompts end without EOS at the limit (8 tokens), `long` more without EOS but shorter (not cut)."""
        rows = {p: {"reward": 0.3, "rouge_l": 0.2, "eos": p >= eos_off + long,
                    "length": 8 if p < eos_off else 5} for p in range(n)}
        return {0: rows, 1: rows}

    def hist(eos: float, rep: float) -> list[dict]:
        return [{"iteration": i, "eval/eos_rate": repr(eos), "eval/repeated_3gram_fraction": repr(rep)}
                for i in (0, 1)]

    a, b = tmp_path / "a", tmp_path / "b"
    # seed 1: B cuts 3 more of 40 (+0.075: worse); EOS −0.06 (worse); 3-grams +0.02 (not beyond)
    write_run(a / "seed-1", tables(2, 0), hist(0.90, 0.05))
    write_run(b / "seed-1", tables(5, 0), hist(0.84, 0.07))
    # seed 2: B cuts 2 more (+0.05: not beyond); 2 more without EOS but short (not cut); 3-grams +0.03 (worse)
    write_run(a / "seed-2", tables(2, 0), hist(0.90, 0.05))
    write_run(b / "seed-2", tables(4, 2), hist(0.86, 0.08))
    # seed 3: nothing worse
    write_run(a / "seed-3", tables(2, 0), hist(0.90, 0.05))
    write_run(b / "seed-3", tables(2, 0), hist(0.95, 0.04))
    result = sd.compare(a, b)
    at1 = {r["seed"]: r for r in result["guardrails"][1]}
    assert at1[1]["cut_rate"] == pytest.approx((2 / n, 5 / n, True))
    assert at1[1]["eos_rate"] == pytest.approx((0.90, 0.84, True))
    assert at1[1]["repeated_3gram_fraction"][2] is False
    assert at1[2]["cut_rate"] == pytest.approx((2 / n, 4 / n, False))
    assert at1[2]["eos_rate"][2] is False and at1[2]["repeated_3gram_fraction"][2] is True
    assert not any(at1[3][m.name][2] for m in record.GUARDRAILS)
    assert sd.worse_seeds(result["guardrails"][1]) == 2
    text = sd.compare_markdown(result, a, b)
    assert "| 1 | 1 | 0.900 → 0.840 (-0.060) | 0.050 → 0.125 (+0.075) | 0.050 → 0.070 (+0.020) | EOS rate, cut at " \
           "the length limit |" in text
    assert "| 1 | 3 | 0.900 → 0.950 (+0.050) | 0.050 → 0.050 (+0.000) | 0.050 → 0.040 (-0.010) | no |" in text
    assert text.rstrip().endswith("| 2 of 3 |")


def test_seeds_compare_runs_without_torch(tmp_path):
    """`rlhf seeds compare` reads run records only: it must not import torch (seconds to load, and absent where
    stored runs are only read)."""
    gen = np.random.default_rng(5)
    for side in ("a", "b"):
        for s in (1, 2):
            write_run(tmp_path / side / f"seed-{s}", {it: {p: {"reward": float(gen.random()), "rouge_l": 0.1}
                                                           for p in range(6)} for it in (0, 1)})
    out = cli_without_torch("seeds", "compare", str(tmp_path / "a"), str(tmp_path / "b"))
    assert "| 1 | reward | 2 |" in out and out.rstrip().endswith("no torch")


def test_stored_runs_intervals_move_less_than_0_002_across_bootstrap_seeds():
    """At the default resamples the bounds of every per-seed change vs iteration 0 of the stored seed runs
    (iteration 4, reward and ROUGE-L) move by less than 0.002 when only the bootstrap's seed changes, and each
    bound's Monte-Carlo error (read from the resamples) is below 0.0015."""
    for name in ("moments-carried", "moments-reset"):
        for s, r in sd.seed_runs(PUBLISHED / name).items():
            for column in ("reward", "rouge_l"):
                d = sd.paired_diffs(r.table(0), r.table(4), column)
                got = [st.bootstrap_interval(d, sd.RESAMPLES, seed, 0.95) for seed in range(5)]
                for bound in ("low", "high"):
                    values = [getattr(iv, bound) for iv in got]
                    assert max(values) - min(values) < 0.002, (name, s, column, bound, values)
                assert max(iv.mc for iv in got) < 0.0015, (name, s, column)


# --------------------------------------------------------------------------------------------- bad inputs


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def small_repo(tmp_path) -> Path:
    """A git repo whose HEAD holds the project's params.yaml: enough for `seeds run` to reach its first worktree."""
    from conftest import ROOT

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"]):
        run(cmd, repo)
    return repo


@pytest.mark.parametrize("override,words", [
    ("optim.lr", "expected key=value"),
    ("=3", "expected key=value"),
    ("optimiser.lr=1e-4", "no section 'optimiser'"),
    ("seed.x=1", "no section 'seed'"),
    ("seed=3", "choose the seeds with --seed"),  # else every run would have seed 3
    ("optim.learning_rate=1e-4", "no key 'optim.learning_rate'"),
    ("optim.lr=-1", "optim.lr"),
    ("data.split_seed=-1", "data.split_seed"),
    ("optim.reset_moments=sometimes", "optim.reset_moments"),
    ("rollout.batch_size=10", "rollout.batch_size"),
])
def test_seeds_run_refuses_a_bad_override_before_any_worktree(small_repo, override, words):
    """Every seed's params are checked before the first worktree is made: a bad --set leaves nothing behind (a
    worktree left behind would later be trained with the unchanged params, since an existing worktree is
    continued)."""
    result = run(["rlhf", "seeds", "run", "-s", "1", "-s", "2", "-n", "1", "--set", "optim.lr=1e-4",
                  "--set", override, "--out", "runs/x"], small_repo, check=False)
    assert words in one_line_error(result)
    assert not (small_repo / "runs").exists()
    assert worktrees(small_repo) == [small_repo.resolve()]


def test_seeds_report_and_compare_refuse_folders_without_seed_runs(tmp_path):
    empty = tmp_path / "empty"
    (empty / "seed-1").mkdir(parents=True)  # a seed folder with no history is no run
    assert "no seed-*/metrics/history.csv" in one_line_error(run(["rlhf", "seeds", "report", str(empty)], tmp_path,
                                                                   check=False))
    assert not (empty / "seeds.md").exists()
    missing = tmp_path / "missing"
    assert "no seed-*" in one_line_error(run(["rlhf", "seeds", "report", str(missing)], tmp_path, check=False))

    gen = np.random.default_rng(2)
    a, b = tmp_path / "a", tmp_path / "b"
    write_history(a / "seed-1", random_history(gen, 2))
    write_history(b / "seed-2", random_history(gen, 2))
    assert "share no seed" in one_line_error(run(["rlhf", "seeds", "compare", str(a), str(b)], tmp_path, check=False))
    assert "no seed-*" in one_line_error(run(["rlhf", "seeds", "compare", str(a), str(empty)], tmp_path, check=False))


@pytest.mark.parametrize("text, value", [("1e-4", 1e-4), ("3.0e-4", 3.0e-4), ("4", 4), ("true", True), ("null", None),
                                         ("cosine", "cosine"), ("[q_proj, v_proj]", ["q_proj", "v_proj"])])
def test_a_set_value_is_read_as_yaml_with_exponent_numbers_as_numbers(text, value):
    from rlhf.seeds import parse_value

    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_a_seed_worktree_of_a_committed_run_starts_without_that_runs_history(small_repo, monkeypatch):
    """`rlhf train --commit` commits metrics/: a worktree of that commit must not count the main run's iterations as
    the seed's own (it would skip training, or mix two runs in one history)."""
    from rlhf.seeds import done_iterations, run as seeds_run

    repo = small_repo
    (repo / "metrics" / "samples").mkdir(parents=True)
    (repo / "metrics" / "history.csv").write_text("iteration,eval/reward_mean\n0,0.3\n1,0.4\n2,0.5\n")
    (repo / "metrics" / "train_history.csv").write_text("iteration,objective/scores\n1,0.4\n2,0.5\n")
    (repo / "metrics" / "samples" / "iter-2.jsonl").write_text('{"prompt_id": "a", "reward": 0.5}\n')
    (repo / "metrics" / "eval_initial.json").write_text("{}")
    (repo / "metrics" / "bench.json").write_text("{}")  # not a run output: kept
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "a committed run"]):
        run(cmd, repo)
    monkeypatch.chdir(repo)
    folder, = seeds_run([7], 0, Path("runs/x"), [], Path("params.yaml"))  # 0 iterations: the worktree alone
    assert done_iterations(folder) == 0
    left = sorted(str(p.relative_to(folder / "metrics")) for p in (folder / "metrics").rglob("*"))
    assert left == ["bench.json", "samples"]  # the archive folder stays, empty (evaluate's dvc.yaml dep)
    assert yaml.safe_load((folder / "params.yaml").read_text())["seed"] == 7


def test_every_seed_of_a_run_trains_the_commit_it_started_from(tmp_path, monkeypatch):
    """A commit made while the seeds train (the user goes on working in the repository) must not reach the seeds
    still to come: one folder, one commit's code. Continuing that folder from another commit is refused in one line,
    before anything trains."""
    import subprocess

    from rlhf import seeds as runner
    from rlhf.errors import StateError

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "code.py").write_text("version = 1\n")
    for cmd in (["git", "init", "-q"], ["git", "add", "."], ["git", "-c", "user.email=t@t", "-c", "user.name=t",
                                                              "commit", "-qm", "one"]):
        subprocess.run(cmd, cwd=repo, check=True)
    real_run = subprocess.run

    def fake(cmd, *args, **kwargs):
        if "train" not in cmd:
            return real_run(cmd, *args, **kwargs)
        folder = Path(kwargs["cwd"])  # a finished seed: its history, then the user commits in the repository
        (folder / "metrics").mkdir(exist_ok=True)
        (folder / "metrics" / "history.csv").write_text("iteration\n0\n1\n")
        (repo / "code.py").write_text(f"version = {len((repo / 'code.py').read_text())}\n")
        for c in (["git", "add", "."], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "more"]):
            real_run(c, cwd=repo, check=True)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake)
    monkeypatch.chdir(repo)
    start = real_run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    runner.run([1, 2], 1, repo / "runs", [], ROOT / "params.yaml")

    def made_from(folder: Path) -> str:
        return real_run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()

    assert [made_from(repo / "runs" / f"seed-{s}") for s in (1, 2)] == [start, start]
    with pytest.raises(StateError, match="seed-1 was made from commit .*, HEAD is"):
        runner.run([1, 2, 3], 1, repo / "runs", [], ROOT / "params.yaml")
    assert not (repo / "runs" / "seed-3").exists()
