"""`rlhf seeds run | report | compare`: one configuration under several seeds, and what the seeds say together.

`run` end to end on a tiny project (2 seeds × 1 iteration, then one seed continued); `report` and `compare` on
hand-written seed folders against naive float64 loops; every bad input refused with one line and exit code 2, before
any worktree is made.
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

from conftest import make_project, run, tiny_params
from rlhf import seeds as sd
from rlhf.config.params import parse_params
from rlhf.reports.statistics import bootstrap_mean

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
        for column, label in sd.METRICS.items():
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
    columns = ["iteration", *sd.METRICS, "eval/kl_to_reference"]
    with open(folder / "metrics" / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in columns} for r in rows)


def random_history(gen: np.random.Generator, iterations: int) -> list[dict]:
    return [{"iteration": i, **{c: repr(float(gen.normal(0.3, 0.2))) for c in sd.METRICS},
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
    assert (1, "ROUGE-L") not in expected and (0, "ROUGE-L") in expected and len(expected) == 3 * 7 - 1
    rows = list(csv.DictReader((tmp_path / "seeds.csv").open()))
    assert [(int(r["iteration"]), r["metric"]) for r in rows] == list(expected)
    for r in rows:
        want = expected[(int(r["iteration"]), r["metric"])]
        assert int(r["n"]) == 3
        for key in ("mean", "std", "min", "max", "seed 7", "seed 11", "seed 42"):
            assert float(r[key]) == pytest.approx(want[key], rel=1e-12, abs=1e-15), (r["iteration"], r["metric"], key)
    md = (tmp_path / "seeds.md").read_text()
    assert md.startswith("# 3 seeds (7, 11, 42)") and result.stdout.strip() == md.strip()
    assert [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "iteration" not in line
            ] == ["0", "1", "2"]
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


def test_the_published_seed_runs_give_back_their_published_tables(tmp_path):
    """docs/runs keeps each seed run in the layout `rlhf seeds run` writes, so `report` and `compare` on those folders
    rebuild the published seeds.md/.csv and compare.md byte for byte: the results page can be checked by a reader."""
    for name in ("moments-carried", "moments-reset"):
        shutil.copytree(PUBLISHED / name, tmp_path / name, ignore=shutil.ignore_patterns("seeds.*"))
        sd.report(tmp_path / name)
        for table in ("seeds.md", "seeds.csv"):
            assert (tmp_path / name / table).read_text() == (PUBLISHED / name / table).read_text(), (name, table)
    rows = sd.compare(tmp_path / "moments-carried", tmp_path / "moments-reset")
    table = sd.compare_markdown(rows, Path("runs/default"), Path("runs/reset"))
    assert table == (PUBLISHED / "compare.md").read_text()


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
    got = {(r["iteration"], r["judge"]): r for r in result}
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
        mean, low, high = bootstrap_mean(pooled, 10_000, 0, 0.95)
        assert r["seeds"] == len(paired) and [k for k in r if k.startswith("seed ")] == [f"seed {s}" for s in paired]
        for s in paired:
            assert r[f"seed {s}"] == pytest.approx(per_seed[s], rel=1e-12, abs=1e-15)
        assert r["delta"] == pytest.approx(math.fsum(pooled) / len(pooled), rel=1e-12, abs=1e-15)
        assert (r["delta"], r["ci_low"], r["ci_high"]) == pytest.approx((mean, low, high), rel=1e-12, abs=1e-15)
        assert r["seeds_b_ahead"] == sum(v > 0 for v in per_seed.values())
    assert got[(0, "reward")]["seeds_b_ahead"] == 1 and got[(0, "reward")]["seed 2"] > 0 > got[(0, "reward")]["seed 3"]

    # the same result whatever the row order of A's tables too
    for s in (1, 2, 3):
        for iteration in (0, 1, 2):
            write_samples(a / f"seed-{s}", iteration, table[(a, s, iteration)], shuffle=17 + s)
    assert sd.compare(a, b) == result

    text = run(["rlhf", "seeds", "compare", str(a), str(b), "--out", str(tmp_path / "cmp.md")], tmp_path).stdout
    r = got[(0, "reward")]
    line = (f"| 0 | reward | 2 | {r['delta']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | 1/2 | "
            f"2: {r['seed 2']:+.4f}, 3: {r['seed 3']:+.4f} |")
    assert line in text and line in (tmp_path / "cmp.md").read_text()


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
