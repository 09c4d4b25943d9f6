"""Project commands outside the DVC graph: `init` (iteration 0), `advance` (next → current) and `train` (loop).

DVC rejects cycles, so the state an iteration starts from (`models/current`) is a `dvc add`-tracked folder that no
stage outputs. The update stage writes `models/next`; `advance` promotes it and re-tracks it, and appends one row to
`metrics/history.csv`, the across-iterations record that `dvc plots show` draws.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rlhf.artifacts.files import STATE_FILE, fresh_tmp_dir, read_json, read_state, replace_dir
from rlhf.artifacts.record import EVAL_COLUMNS, METRICS, read_history, upsert_csv
from rlhf.config.params import Params
from rlhf.errors import StateError
from rlhf.reports import samples as samples_report
from rlhf.runtime.log import log
from rlhf.runtime.stage import EXPECTED_ERRORS_EXIT

# Iteration k's training row describes the update that produced it (rollout of k − 1), so it starts at 1.
TRAIN_COLUMNS = [
    "iteration", "objective/scores", "objective/kl", "objective/entropy", "objective/rlhf_reward",
    "objective/non_score_reward", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac",
    "val/response_length", "val/num_eos_tokens", "lr", "objective/kl_coef", "val/explained_variance",
    "policy/dual_clipfrac",
]



def history_path(params: Params, name: str = "history.csv") -> Path:
    return Path(params.paths.metrics) / name


def append_history(params: Params, row: dict) -> None:
    upsert_csv(history_path(params), EVAL_COLUMNS, row)
    if "objective/scores" in row:
        upsert_csv(history_path(params, "train_history.csv"), TRAIN_COLUMNS, row)


def record_history(params: Params, iteration: int) -> None:
    """The finished repro's metrics as row `iteration` of the history CSVs (an upsert: recording it twice, before
    the tagged commit and again at advance, gives one row)."""
    metrics_dir = Path(params.paths.metrics)
    row: dict = {}
    for name in ("objective.json", "update.json", "eval.json"):
        if (metrics_dir / name).exists():
            row.update(read_json(metrics_dir / name))
    row["iteration"] = iteration
    append_history(params, row)


def _env() -> dict:
    """Stage commands call `python`; make this interpreter's bin folder win, activated venv or not."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}


def dvc(*args: str) -> None:
    """`dvc ARGS`; Ctrl-C raises interrupt.DvcInterrupted (a KeyboardInterrupt) once DVC has stopped."""
    from rlhf.runtime.interrupt import run_dvc

    log("$ dvc " + " ".join(args))
    code = run_dvc(list(args), _env())
    if code != 0:
        raise StateError(f"`dvc {' '.join(args)}` failed with exit code {code}")


def git(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=check)


def init(params: Params, force: bool = False, evaluate_baseline: bool = True, track: bool = True) -> None:
    current = Path(params.paths.current)
    if (current / STATE_FILE).exists() and not force:
        raise StateError(f"{current} already holds iteration {read_state(current)['iteration']}; use --force to reset")
    check_base(Path(params.paths.policy_model), params.policy_model.id, params.policy_model.revision, "policy_model")
    if evaluate_baseline:
        check_base(Path(params.paths.reward_model), params.reward_model.id, params.reward_model.revision,
                   "reward_model")
    from rlhf.models.checkpoint import init_state  # torch: imported only by the commands that make models
    from rlhf.models.start import sft_record

    if params.sft.enabled and sft_record(Path(params.paths.sft)) is None:
        raise StateError(f"sft.enabled, but {params.paths.sft} holds no SFT adapter: run `dvc repro sft` first")

    tmp = fresh_tmp_dir(current)
    try:
        init_state(params, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused or interrupted init leaves nothing behind
        raise
    replace_dir(tmp, current)
    log(f"init: iteration 0 written to {current}")
    metrics_dir = Path(params.paths.metrics)
    clear_history(metrics_dir)
    (metrics_dir / "samples").mkdir(parents=True, exist_ok=True)  # a dep of the evaluate stage, even if left empty
    if evaluate_baseline:
        # In a process of its own, as a stage runs: `rlhf train` goes on to `dvc repro`, whose stages need the
        # device memory (and, on a GPU, the CUDA context) that the policy and reward model held here.
        result = subprocess.run([sys.executable, "-m", "rlhf.project", "baseline"], input=params.model_dump_json(),
                                text=True, env=_env())
        if result.returncode == EXPECTED_ERRORS_EXIT:
            raise SystemExit(result.returncode)  # its one `error:` line is already on stderr
        if result.returncode != 0:
            raise StateError(f"the baseline evaluation of iteration 0 failed (exit code {result.returncode})")
    if track:
        dvc("add", str(current))


def clear_history(metrics_dir: Path) -> None:
    """A new iteration 0 starts a new run: rows and held-out tables left by an earlier one (`init --force`) would
    read as this run's iterations, and its iteration-0 table would be what later evaluations compare with."""
    for name in ("history.csv", "train_history.csv", "eval_initial.json", "samples_initial.jsonl",
                 "samples_initial.md"):
        (metrics_dir / name).unlink(missing_ok=True)
    for table in (metrics_dir / "samples").glob("iter-*.jsonl"):
        table.unlink()


def check_base(folder: Path, model_id: str, revision: str | None, stage: str) -> None:
    """The base model folder must hold the model the params name: after a change of preset it still holds the
    previous one until its stage runs again."""
    from rlhf.models.sources import SOURCE_FILE

    source_file = folder / SOURCE_FILE
    if not source_file.exists():
        raise StateError(f"{folder} missing: run `dvc repro {stage}` first")
    source = json.loads(source_file.read_text())
    if (source.get("id"), source.get("revision")) != (model_id, revision):
        found = source.get("id") + (f"@{source['revision']}" if source.get("revision") else "")
        wanted = model_id + (f"@{revision}" if revision else "")
        raise StateError(f"{folder} holds {found} but params.yaml's {stage}.id is {wanted}: "
                         f"run `dvc repro {stage}` first")


def baseline_evaluation(params: Params) -> None:
    from rlhf.evaluation import evaluate

    current, metrics_dir = Path(params.paths.current), Path(params.paths.metrics)
    metrics = evaluate(params, current, metrics_dir / "eval_initial.json", metrics_dir / "samples_initial.md")
    append_history(params, metrics)
    samples_report.archive(metrics_dir / "samples_initial.jsonl", metrics_dir, 0)
    samples_report.write(metrics_dir, 0)


def advance(params: Params, track: bool = True) -> int:
    current, nxt = Path(params.paths.current), Path(params.paths.next)
    if not (nxt / STATE_FILE).exists():
        raise StateError(f"{nxt} holds no finished update; run `dvc repro` first")
    before, after = read_state(current)["iteration"], read_state(nxt)["iteration"]
    if after == before + 1:
        tmp = fresh_tmp_dir(current)
        shutil.rmtree(tmp)
        shutil.copytree(nxt, tmp)  # models/next stays, so dvc.lock keeps matching the workspace
        replace_dir(tmp, current)
    elif after == before and same_tree(current, nxt):
        log(f"advance: {current} already holds iteration {after}; finishing the bookkeeping")  # resumed after a crash
    else:
        raise StateError(f"{nxt} is iteration {after} but {current} is {before}: nothing to advance "
                         "(already advanced? run `dvc repro`)")
    metrics_dir = Path(params.paths.metrics)
    record_history(params, after)
    if (metrics_dir / "samples.jsonl").exists():
        samples_report.archive(metrics_dir / "samples.jsonl", metrics_dir, after)
        samples_report.write(metrics_dir, after)
    if track:
        dvc("add", str(current))
    log(f"advance: {current} is now iteration {after}")
    return after


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def tag_commit(tag: str) -> str | None:
    """The commit an existing tag points at (abbreviated), or None."""
    found = git("rev-parse", "-q", "--verify", f"refs/tags/{tag}^{{commit}}", check=False)
    return found.stdout.strip()[:12] if found.returncode == 0 else None


def check_tags_free(tags: list[str], force: bool) -> None:
    """A tag names what an iteration was; moving one silently rewrites history others may have fetched."""
    taken = [(tag, sha) for tag in tags if (sha := tag_commit(tag))]
    if taken and not force:
        names = ", ".join(tag for tag, _ in taken)
        verb = "tags {} already exist" if len(taken) > 1 else "tag {} already exists"
        raise StateError(f"{verb.format(names)} ({taken[0][0]} is on {taken[0][1]}); --force moves existing "
                         "tags, --tag-prefix gives new names")


def planned_tags(params: Params, iterations: int, tag_prefix: str) -> list[str]:
    """The tags `train --commit` will write: iteration 0 if it has to make it, then the next `iterations`."""
    current = Path(params.paths.current)
    if (current / STATE_FILE).exists():
        start = read_state(current)["iteration"]
        return [f"{tag_prefix}{start + k}" for k in range(1, iterations + 1)]
    return [f"{tag_prefix}{k}" for k in range(iterations + 1)]


def commit(params: Params, message: str, tag: str | None = None, force: bool = False) -> None:
    if tag:
        check_tags_free([tag], force)  # before committing: a refused tag leaves the history as it was
    paths = ["dvc.lock", f"{params.paths.current}.dvc", params.paths.metrics, "params.yaml"]
    git("add", "--", *[p for p in paths if Path(p).exists()])
    git("add", "-u")
    done = git("commit", "-m", message, check=False)
    if done.returncode != 0 and "nothing to commit" not in done.stdout:
        raise StateError(f"git commit failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    if tag:
        tagged = git("tag", *(["-f"] if force else []), tag, check=False)
        if tagged.returncode != 0:
            raise StateError(f"git tag {tag} failed: {(tagged.stderr or tagged.stdout).strip().splitlines()[-1]}")
        log(f"train: committed and tagged {tag}")


class Interrupted(Exception):
    """Ctrl-C during `rlhf train`: where it stopped (the message) and how many iterations it finished (done)."""

    def __init__(self, where: str, done: int):
        super().__init__(where)
        self.done = done


def train(params: Params, iterations: int | None, commit_each: bool, tag_prefix: str = "iter-", push: bool = False,
          force_tags: bool = False) -> None:
    """Bring the run to train.iterations (iterations None) or N more iterations: N × (dvc repro, advance). A run
    already at train.iterations does nothing; an interrupted iteration continues, its finished stages restored from
    DVC's cache. Ctrl-C raises Interrupted once the child processes have stopped.

    With commit_each, tag `iter-N` marks the commit right after the repro that made iteration N (models/next = N,
    `dvc repro` there is a no-op, metrics are N's); an untagged commit follows the advance. `dvc metrics diff iter-1
    iter-3` then compares iterations. Existing tags are moved only with force_tags, and that is checked for every
    planned tag before any work."""
    from rlhf.runtime.interrupt import deferred

    current = Path(params.paths.current)
    started = (current / STATE_FILE).exists()
    first = read_state(current)["iteration"] if started else 0
    if iterations is None:
        iterations = max(0, params.train.iterations - first)
        if started and iterations == 0:
            log(f"train: {current} already holds iteration {first} (train.iterations: {params.train.iterations}); "
                "nothing to do (`rlhf train -n N` trains N more)")
            return
    params.check_schedule_horizon(first + iterations - 1)  # refuse before any work, not at the update stage
    if commit_each:
        check_tags_free(planned_tags(params, iterations, tag_prefix), force_tags)
    start, where = time.perf_counter(), "while setting up models, prompts and iteration 0"
    try:
        dvc("repro", "prepare", "reward_model", "sft")
        fresh = not started
        if started and first == 0 and not (Path(params.paths.metrics) / "eval_initial.json").exists():
            log("train: iteration 0 was cut short before its evaluation; making it again")
            fresh = True
        if fresh:
            init(params, force=started)
            if commit_each:
                commit(params, "PPO iteration 0 (initial state)", f"{tag_prefix}0", force_tags)
            if push:
                dvc("push", str(Path(f"{params.paths.current}.dvc")))
        else:
            finish_advance(params)
        timings = [("models, prompts, iteration 0 + its evaluation", time.perf_counter() - start)]
        for _ in range(iterations):
            t = time.perf_counter()
            where = f"in iteration {read_state(current)['iteration'] + 1}"
            dvc("repro")
            iteration = read_state(params.paths.next)["iteration"]
            with deferred():  # the iteration's bookkeeping is done whole or not begun
                if commit_each:
                    # the tagged commit's history CSVs (what `dvc plots diff iter-M iter-N` draws) end at its own
                    # iteration
                    record_history(params, iteration)
                    commit(params, f"PPO iteration {iteration}", f"{tag_prefix}{iteration}", force_tags)
                if push:
                    dvc("push")  # this iteration's state and artifacts, while they are the workspace's
                advance(params)
                if commit_each:
                    commit(params, f"advance to iteration {iteration}")
                if push:
                    dvc("push", str(Path(f"{params.paths.current}.dvc")))
                where = f"after iteration {iteration}"
            timings.append((f"iteration {iteration} (dvc repro + advance)", time.perf_counter() - t))
            log(f"train: iteration {iteration} took {timings[-1][1]:.0f} s")
        print_summary(params)
        print("\nwall time: " + "; ".join(f"{name} {secs:.0f} s" for name, secs in timings)
              + f"; total {time.perf_counter() - start:.0f} s")
        from rlhf.runtime.device import machine_line

        # the times above mean little without it: machines of one kind differ 2× and more
        print(machine_line(params.policy_model.dtype, params.runtime.device))
    except KeyboardInterrupt as stop:
        stage = getattr(stop, "stage", "")
        reached = read_state(current)["iteration"] if (current / STATE_FILE).exists() else 0
        kept = f"iteration {reached} is kept, " if reached else ""
        raise Interrupted(f"stopped {where}{f' (stage {stage!r})' if stage else ''}: nothing is lost ({kept}"
                          "finished stages are in DVC's cache)", max(0, reached - first)) from None


def finish_advance(params: Params) -> None:
    """An advance killed after it promoted models/next (Ctrl-C cannot cut it: train defers it) left its history row
    unwritten: finish it before the next iteration."""
    current, nxt = Path(params.paths.current), Path(params.paths.next)
    if not (nxt / STATE_FILE).exists():
        return
    iteration = read_state(current)["iteration"]
    path = history_path(params)
    rows = {int(r["iteration"]) for r in read_history(path)}
    if read_state(nxt)["iteration"] == iteration and iteration not in rows:
        advance(params)


# The `rlhf train` table: (metric, header, width), an interval beside its metric where it has one (a width leaves
# room for " borderline").
SUMMARY = [("reward_mean", "reward", 7), ("reward_delta_vs_initial", "Δ reward vs it. 0 [interval]", 37),
           ("reward_delta_vs_initial_length_adjusted", "length-adjusted Δ", 17),
           ("win_rate_vs_initial", "win rate vs it. 0 [interval]", 28), ("rouge_l_mean", "ROUGE-L", 7),
           ("rouge_l_delta_vs_initial", "Δ ROUGE-L vs it. 0 [interval]", 37), ("kl_mean", "KL", 6),
           ("length_mean", "length", 6), ("eos_rate", "EOS", 4), ("cut_rate", "cut", 4),
           ("repeated_3gram_fraction", "rep. 3-grams", 12)]


def print_summary(params: Params) -> None:
    from rlhf.reports.judge import disagreement_warning

    path = history_path(params)
    rows = read_history(path)
    print("\n" + f"{'iteration':>9}  " + "  ".join(f"{header:>{width}}" for _, header, width in SUMMARY))
    warnings = []
    for r in rows:
        cells = [(_with_interval(r, name) if METRICS[name].interval and name != "reward_delta_vs_initial_length_adjusted"
                  else _cell(r, METRICS[name].key, METRICS[name].fmt)) for name, _, _ in SUMMARY]
        print(f"{r['iteration']:>9}  " + "  ".join(f"{c:>{width}}" for c, (_, _, width) in zip(cells, SUMMARY)))
        flag = r.get("eval/judge_disagreement") or ""
        warning = disagreement_warning(float(flag)) if flag else None
        if warning:
            warnings.append(f"iteration {r['iteration']}: {warning}")
    r2 = [float(r["eval/reward_length_r2"]) for r in rows if r.get("eval/reward_length_r2")]
    if r2:
        print(f"length-adjusted Δ: the reward-on-length fit at iteration 0 has R² {r2[-1]:.3f} (the control's power)")
    for line in warnings:
        print(line)
    m = Path(params.paths.metrics)
    print(f"\nmetrics: {m / 'eval.json'}, {m / 'update.json'}, {m / 'objective.json'}, history {path}")
    print(f"sample table: {m / 'report.html'} / {m / 'report.md'} (vs. previous iteration), {m / 'samples.md'}")
    print("compare: dvc metrics diff · dvc plots show · dvc exp show")


def _cell(row: dict, key: str, fmt: str) -> str:
    """A history.csv value formatted, or "–" where it is empty (an older history, or a comparison left out)."""
    value = row.get(key) or ""
    return format(float(value), fmt) if value else "–"


def _with_interval(row: dict, name: str) -> str:
    """The value and its interval, "borderline" where a bound is within its Monte-Carlo error of no change."""
    from rlhf.reports.statistics import Interval, interval_text

    m = METRICS[name]
    point, low, high, mc = (row.get(c) or "" for c in m.columns())
    if not point:
        return "–"
    if not low:
        return format(float(point), m.fmt)
    return interval_text(Interval(float(point), float(low), float(high), float(mc or 0)), m.fmt, m.null)


if __name__ == "__main__":  # `python -m rlhf.project baseline`, params as JSON on stdin (init's child process)
    from rlhf.config.params import parse_params
    from rlhf.runtime.stage import configure, guarded

    sys.exit(guarded(lambda: baseline_evaluation(configure(parse_params(json.loads(sys.stdin.read()))))))
