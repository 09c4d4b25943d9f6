"""The `rlhf` command: the project commands (init / advance / train) and the tools around the pipeline. The DVC stages
themselves are the scripts in stages/ (`python stages/<name>.py`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from rlhf.runtime.interrupt import quiet_interrupts

quiet_interrupts()  # a Ctrl-C while the command starts: no traceback (rlhf train says where it stopped)

import typer  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="RLHF with PPO + LoRA as a DVC pipeline. `dvc repro` runs one iteration (stages/*.py); these are the commands around it.")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file")


def _params(path: Path):
    from rlhf.config.params import load_params
    from rlhf.runtime.stage import configure

    return configure(load_params(path))


def _run(fn, *args) -> None:
    """Expected failures become one line on stderr and exit code 2 (no traceback), as in the stage scripts. What fn
    returns is not an exit code (`advance` returns the new iteration, which once became the command's exit code)."""
    from rlhf.runtime.stage import guarded

    def call() -> None:
        fn(*args)

    code = guarded(call)
    if code:
        raise typer.Exit(code)


@app.command()
def init(params: Path = ParamsOpt, force: bool = typer.Option(False, help="overwrite an existing state"),
         baseline: bool = typer.Option(True, help="evaluate iteration 0 into metrics/eval_initial.json"),
         track: bool = typer.Option(True, help="`dvc add` the state folder")):
    """Create iteration 0 (fresh LoRA adapter, critic, value head) deterministically from the seed."""
    from rlhf import project as st

    _run(lambda: st.init(_params(params), force, baseline, track))


@app.command()
def advance(params: Path = ParamsOpt, track: bool = typer.Option(True, help="`dvc add` the state folder")):
    """Promote models/next to models/current and record the iteration in metrics/history.csv."""
    from rlhf import project as st

    _run(lambda: st.advance(_params(params), track))


@app.command()
def train(params: Path = ParamsOpt,
          iterations: Optional[int] = typer.Option(None, "--iterations", "-n", min=0,
                                                   help="this many more iterations (default: up to "
                                                        "train.iterations); 0: only models, prompts and iteration 0"),
          commit: bool = typer.Option(False, help="git commit + tag each iteration (iter-N)"),
          tag_prefix: str = typer.Option("iter-", help="tag name prefix"),
          push: bool = typer.Option(False, help="dvc push every iteration's state to the default remote"),
          force: bool = typer.Option(False, "--force", help="with --commit: move iteration tags that already exist")):
    """Bring the run to train.iterations PPO iterations (dvc repro + advance each), or -n N more. Run again, it
    continues where it stopped; a finished run does nothing."""
    from rlhf import project as st

    def go():
        p = _params(params)
        try:
            st.train(p, iterations, commit, tag_prefix, push, force)
        except st.Interrupted as stop:
            again = ["rlhf train", *([f"-p {params}"] if params != Path("params.yaml") else []),
                     *([f"-n {iterations - stop.done}"] if iterations is not None else []),
                     *(["--commit"] if commit else []), *(["--push"] if push else []),
                     *([f"--tag-prefix {tag_prefix}"] if tag_prefix != "iter-" else [])]
            typer.echo(f"{stop}; continue with: {' '.join(again)}", err=True)
            raise typer.Exit(130)

    _run(go)


@app.command("check-params")
def check_params(params: Path = ParamsOpt):
    """Validate params.yaml and print the derived sizes."""
    def go():
        p = _params(params)
        typer.echo(f"ok: batch {p.rollout.batch_size} = {p.num_micro_batches} micro-batches of "
                   f"{p.rollout.micro_batch_size}; {p.ppo.num_minibatches} minibatches × {p.ppo.epochs} epochs "
                   f"= {p.ppo.num_minibatches * p.ppo.epochs} optimizer steps per iteration")

    _run(go)


@app.command()
def export(params: Path = ParamsOpt,
           state: Optional[Path] = typer.Option(None, help="state folder (default: paths.current)"),
           out: Path = typer.Option(Path("models/export"), help="output folder (adapter/ and merged/)")):
    """Write the policy as a peft adapter folder and as a merged model folder."""
    from rlhf.reports import export as stage

    def go():
        p = _params(params)
        stage.run(p, state or Path(p.paths.current), out)

    _run(go)


@app.command("rm-accuracy")
def rm_accuracy(params: Path = ParamsOpt,
                comparisons: Path = typer.Option(Path("data/tldr/comparisons-batch13-18.parquet")),
                out: Path = typer.Option(Path("metrics/rm_accuracy.json")),
                limit: Optional[int] = typer.Option(None, help="score only the first N pairs")):
    """Reward-model accuracy on real human TL;DR preferences, with a 95% interval and a confidence breakdown."""
    from rlhf.reports import rm_accuracy as stage

    _run(lambda: stage.run(_params(params), comparisons, out, limit))


@app.command()
def plots(params: Path = ParamsOpt,
          out: Path = typer.Option(Path("metrics/plots"), help="output folder: one SVG per plot and index.html"),
          screenshots: bool = typer.Option(False, help="also write plots.png (all plots) and report.png (the sample "
                                                       "report, needs Chromium) to --images"),
          images: Path = typer.Option(Path("docs/images"), help="where --screenshots writes its PNGs")):
    """Draw dvc.yaml's plots offline (vl-convert: no browser, no network) to SVG files and an HTML page."""
    from rlhf.reports import plots as stage

    def go():
        p = _params(params)  # a params slip stops here with its one line, before DVC reads the file
        svgs = stage.render(out)
        if screenshots:
            written = [stage.png_sheet(svgs, images / "plots.png")]
            report = Path(p.paths.metrics) / "report.html"
            if not report.exists():
                typer.echo(f"no {report} yet (`rlhf init` and `rlhf advance` write it): report.png not written",
                           err=True)
            elif not stage.has_browser():
                typer.echo("chromium not found: report.png not written (plots.png needs no browser)", err=True)
            else:
                written.append(stage.screenshot(report, images / "report.png"))
            typer.echo(f"screenshots: {', '.join(str(p) for p in written)}")

    _run(go)


@app.command()
def preset(name: str = typer.Argument(..., help="qwen3-skywork or embedded"), params: Path = ParamsOpt,
           policy_revision: Optional[str] = typer.Option(None, help="pin the policy's hub revision"),
           reward_revision: Optional[str] = typer.Option(None, help="pin the reward model's hub revision")):
    """Switch params.yaml to a named configuration (comments kept); then `rlhf init --force` and `dvc repro`."""
    from rlhf.config import presets

    def go():
        revs = {"policy_model": policy_revision, "reward_model": reward_revision}
        presets.apply(name, params, {k: v for k, v in revs.items() if v})
        typer.echo(f"{params}: preset {name!r} applied. The LoRA state depends on the base model, so start over with:"
                   f"\n  rlhf init --force && dvc repro   (or: rlhf train -n N)")

    _run(go)


@app.command()
def warm(action: str = typer.Argument("status", help="status or stop")):
    """The warm process that model stages fork from (runtime.warm_start): list it, or stop it."""
    from rlhf.runtime import warm_start as w

    if action == "stop":
        typer.echo(f"stopped {w.stop_all()} warm process(es)")
    elif action == "status":
        for pid, sock in w.running():
            typer.echo(f"pid {pid}  rss {w.rss_kib(pid) / 2**20:.2f} GiB  {sock}")
    else:
        raise typer.BadParameter("status or stop")


@app.command("params-doc")
def params_doc(params: Path = ParamsOpt):
    """Print the params reference (Markdown) generated from the typed params and params.yaml's comments."""
    from rlhf.config.reference import render

    _run(lambda: typer.echo(render(params)))


@app.command()
def report(params: Path = ParamsOpt,
           configs: Path = typer.Option(Path("models/configs"), help="folder with the Qwen3 + Skywork models' configs")):
    """LoRA trainable count and per-component memory estimate for the Qwen3 + Skywork models (meta device)."""
    def go():
        from rlhf.reports.memory import render

        typer.echo(render(_params(params), configs))

    _run(go)

seeds_app = typer.Typer(no_args_is_help=True, help="The same configuration under several seeds, and the seeds together.")
app.add_typer(seeds_app, name="seeds")


@seeds_app.command("run")
def seeds_run(seeds: list[int] = typer.Option([42, 1, 2], "--seed", "-s", help="a seed (repeat the option)"),
              iterations: int = typer.Option(4, "--iterations", "-n", min=1),
              out: Path = typer.Option(Path("runs/seeds"), help="folder of the seed-<s> worktrees"),
              overrides: list[str] = typer.Option([], "--set", help="key=value in params.yaml, e.g. optim.lr=1e-4"),
              params: Path = ParamsOpt):
    """Train each seed in its own git worktree of the commit HEAD names at the start (this params.yaml, `seed` and
    --set applied), one after another, then write the report. A stopped run is continued from the same commit."""
    from rlhf import seeds as sd
    from rlhf.reports import seeds as seeds_report

    def go():
        sd.run(list(seeds), iterations, out, list(overrides), params)
        seeds_report.report(out)

    _run(go)


@seeds_app.command("report")
def seeds_report(out: Path = typer.Argument(Path("runs/seeds"), help="folder of seed-<s> runs")):
    """Mean and spread across seeds per iteration (seeds.md / seeds.csv), the change vs iteration 0 with seed-level
    and pooled intervals, the guardrails per seed, and every seed's curve (seeds.svg/png)."""
    from rlhf.reports import seeds as sd

    _run(lambda: print((out / "seeds.md").read_text() if sd.report(out) else ""))


@seeds_app.command("compare")
def seeds_compare(a: Path = typer.Argument(..., help="baseline seeds folder"),
                  b: Path = typer.Argument(..., help="variant seeds folder"),
                  out: Optional[Path] = typer.Option(None, help="also write the tables to this Markdown file"),
                  into: Optional[Path] = typer.Option(None, help="also write them into this Markdown file's block"),
                  block: str = typer.Option("seeds-compare", help="the block's name: <!-- NAME:start --> … end")):
    """B − A per iteration on ROUGE-L and on the reward, paired by seed and held-out prompt, with seed-level and
    pooled intervals, and B's guardrails against A's per seed."""
    from rlhf.reports import seeds as sd
    from rlhf.reports.blocks import replace_block

    def go():
        text = sd.compare_markdown(sd.compare(a, b), a, b)
        print(text)
        if out:
            out.write_text(text)
        if into:
            into.write_text(replace_block(into.read_text(), block, text, str(into)))

    _run(go)


@seeds_app.command("table")
def seeds_table(folders: list[Path] = typer.Argument(..., help="seeds folders, one per configuration"),
                iteration: int = typer.Option(..., "--iteration", "-n", help="the iteration shown"),
                detail: bool = typer.Option(False, help="also win rates, length control, repeated 3-grams, KL"),
                into: Optional[Path] = typer.Option(None, help="write the table into this Markdown file's block"),
                block: str = typer.Option("results-table", help="the block's name: <!-- NAME:start --> … end")):
    """One iteration of several configurations, a row per seed and each one's seed-level mean change (Markdown)."""
    from rlhf.reports import seeds as sd
    from rlhf.reports.blocks import replace_block

    def go():
        text = sd.results_table({f.name: f for f in folders}, iteration, detail)
        if into:
            into.write_text(replace_block(into.read_text(), block, text, str(into)))
        print(text, end="")

    _run(go)


history_app = typer.Typer(no_args_is_help=True, help="What a run's stored history says (history.csv), without torch.")
app.add_typer(history_app, name="history")


@history_app.command("table")
def history_table(folders: list[Path] = typer.Argument(..., help="run folders: each holds history.csv or "
                                                                  "metrics/history.csv"),
                  iterations: list[str] = typer.Option([], "--iterations", "-i",
                                                       help="e.g. 0,4,6-9 or 1- (from 1 to the run's last): one for "
                                                            "every folder, or one per folder in order; default: every "
                                                            "iteration"),
                  labels: list[str] = typer.Option([], "--label", "-l", help="the run column's text, one per folder "
                                                                             "in order (default: the folder's name)"),
                  metrics: list[str] = typer.Option([], "--metric", help="also this held-out metric of the run "
                                                                         "record, e.g. reward_delta_vs_previous or "
                                                                         "distinct_2 (after the default columns)"),
                  train_metrics: list[str] = typer.Option([], "--train-metric", help="also this train_history.csv "
                                                                                     "column, e.g. "
                                                                                     "val/explained_variance"),
                  into: Optional[Path] = typer.Option(None, help="write the table into this Markdown file's block"),
                  block: str = typer.Option("history-table", help="the block's name: <!-- NAME:start --> … end")):
    """The held-out table of one or more runs at the chosen iterations (reward, Δ and win rate vs iteration 0 with
    their intervals, EOS rate, repeated 3-grams, length, KL, and any --metric or --train-metric columns), as
    Markdown."""
    from rlhf.reports import history as hist
    from rlhf.reports.blocks import replace_block

    def go():
        text = hist.table(list(folders), list(labels), list(iterations), list(train_metrics), list(metrics))
        if into:
            into.write_text(replace_block(into.read_text(), block, text, str(into)))
        print(text, end="")

    _run(go)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def torchrun(ctx: typer.Context):
    """torchrun with its failures in one line: a node that misses the rendezvous, an endpoint that cannot be reached,
    a rank that dies or hangs. Takes torchrun's arguments (`torchrun --help` lists them); the multi-node launcher of
    docs/cluster.md."""
    from rlhf.runtime.launch import main as launch

    code = launch(list(ctx.args))
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
