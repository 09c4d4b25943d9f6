"""Held-out evaluation of a policy state: reward, an independent judge (ROUGE against the human TL;DR), exact KL to
the reference, length, EOS rate and a sample table on the fixed eval prompts, and comparisons with iteration 0 and the
previous iteration on the same prompts (paired bootstrap intervals, rlhf/reports/statistics.py), the reward change
with the part that length explains taken out, and a warning when the reward and the judge contradict each other. Greedy (`eval.greedy`) or `eval.samples_per_prompt` samples per prompt at
`eval.temperature`, seeded the same every iteration; per-prompt values are the means over a prompt's samples."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from rlhf.artifacts import record
from rlhf.artifacts.files import atomic_write_text, read_state, write_json
from rlhf.artifacts.record import column, read_table
from rlhf.artifacts.schema import check_token_ids, read_artifact
from rlhf.config.params import Eval, Params
from rlhf.models.checkpoint import load_actors
from rlhf.models.reference_cache import reference_kl, reference_prompt_kv
from rlhf.models.sampling import contains_stop, generate_with_reference_kl
from rlhf.models.scorers import load_scorer
from rlhf.reports import judge
from rlhf.reports import statistics as st
from rlhf.reports.samples import post_text
from rlhf.runtime.device import resolve_device
from rlhf.runtime.log import log
from rlhf.runtime.seeding import derive_seed


def evaluate_policy(params: Params, state_dir: Path) -> tuple[dict, pd.DataFrame]:
    prompts_path = Path(params.paths.prepared) / "eval.parquet"
    prompts = read_artifact(prompts_path, "prompts")
    cfg = params.eval
    per_prompt = 1 if cfg.greedy else cfg.samples_per_prompt
    rows = [i for i in range(len(prompts)) for _ in range(per_prompt)]  # a prompt's samples side by side
    ids = [prompts["prompt_ids"].iloc[i] for i in rows]
    actors = load_actors(params, state_dir, trainable=False, with_critic=False)
    check_token_ids(prompts, prompts_path, actors.vocab_size)
    responses, kls = held_out_responses(params, actors, prompts["prompt_ids"].tolist(), ids, rows)
    texts = actors.tokenizer.batch_decode(responses, skip_special_tokens=True)
    eos = [contains_stop(r, actors.stop_ids) for r in responses]
    device = actors.device
    del actors  # the policy is freed before the reward model is loaded
    device.free()
    scorer = load_scorer(Path(params.paths.reward_model), params.reward_model,
                         resolve_device(params.runtime.device, params.reward_model.dtype))
    rewards = scorer.score([prompts["query"].iloc[i] for i in rows], texts,
                           [prompts["reference"].iloc[i] for i in rows])
    references = [prompts["reference"].iloc[i] for i in rows]
    lengths = [len(r) for r in responses]
    samples = pd.DataFrame({"row": rows, "summary": texts, "reward": rewards, "kl": kls, "length": lengths,
                            "eos": eos, "cut": [not e and n >= cfg.max_new_tokens for e, n in zip(eos, lengths)],
                            **judge.rouge(texts, references)})
    table = per_prompt_table(prompts, samples)
    metrics = {
        "iteration": read_state(state_dir)["iteration"],
        "eval/reward_mean": float(table["reward"].mean()),
        "eval/reward_std": float(table["reward"].std(ddof=1)) if len(table) > 1 else 0.0,
        **{f"eval/{name}_mean": float(table[name].mean()) for name in judge.ROUGE_TYPES},
        "eval/kl_mean": float(table["kl"].mean()),
        "eval/length_mean": float(table["length"].mean()),
        "eval/eos_rate": float(table["eos"].mean()),
        "eval/cut_rate": float(table["cut"].mean()),
        "eval/num_prompts": len(table),
        "eval/samples_per_prompt": per_prompt,
        "eval/repeated_3gram_fraction": st.mean_repeated_ngram_fraction(texts, 3),
        "eval/distinct_2": st.distinct_n(texts, 2),
    }
    metrics.update(comparison_metrics(table, metrics["iteration"], Path(params.paths.metrics) / "samples", cfg,
                                      derive_seed(params.seed, "eval", "bootstrap")))
    return metrics, table


def held_out_responses(params: Params, actors, prompt_ids: list, ids: list, rows: list) -> tuple[list, list]:
    """The summaries of `ids` (row j is held-out prompt rows[j]) and their KL to the reference. π's log-probs are
    the sampler's own, kept while decoding; π_ref's come from the reference over the responses only, on top of its
    keys/values of the fixed held-out prompts (computed once, kept in eval.reference_cache; freed on return). No
    second pass of the policy, no reference pass over the prompts."""
    cfg, per_pass = params.eval, params.rollout.micro_batch_size
    kv = reference_prompt_kv(actors, prompt_ids, per_pass, cfg.reference_cache)

    def kl_of(chunk_rows: list, responses: list, kept) -> list:
        return reference_kl(kv, [rows[j] for j in chunk_rows], [ids[j] for j in chunk_rows], responses, kept, actors,
                            cfg.temperature, per_pass)

    return generate_with_reference_kl(
        actors, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_p, seed=derive_seed(params.seed, "eval"),
        chunk_size=cfg.generation_chunk, kl_temperature=cfg.temperature, reference_kl=kl_of,
        progress=params.runtime.progress, greedy=cfg.greedy, rows_per_pass=per_pass)


def per_prompt_table(prompts: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """One row per held-out prompt, so every later comparison pairs prompts: its first summary (all of them in
    `summaries`), and the mean reward, ROUGE, KL and length and the EOS and cut fractions over its samples."""
    by_prompt = samples.groupby("row", sort=True)
    means = {name: by_prompt[name].mean().to_numpy()
             for name in ("reward", *judge.ROUGE_TYPES, "kl", "length", "eos", "cut") if name in samples.columns}
    return pd.DataFrame({
        "prompt_id": prompts["prompt_id"].to_numpy(), "query": prompts["query"].to_numpy(),
        "summary": by_prompt["summary"].first().to_numpy(), **means,
        "reference": prompts["reference"].to_numpy(), "summaries": by_prompt["summary"].agg(list).to_numpy(),
    })


def paired(now: pd.Series, before: pd.Series | None, what: str) -> pd.Series | None:
    """`before` aligned to `now`'s prompts, or None when there is nothing to pair with: a comparison over other or
    fewer prompts would not be paired, so it is left out rather than reported on a different set."""
    if before is None:
        return None
    if set(before.index) != set(now.index):
        log(f"evaluate: the {what} held-out table covers other prompts (eval set changed?): comparisons left out")
        return None
    return before.reindex(now.index)


def column_or_log(table: pd.DataFrame | None, name: str, what: str) -> pd.Series | None:
    """`column`, saying why when a table that exists lacks the column."""
    values = column(table, name)
    if table is not None and values is None:
        log(f"evaluate: the {what} held-out table has no {name} column (written before it was measured): "
            f"its {record.JUDGES[name]} comparisons are left out (null)")
    return values


def comparison_metrics(table: pd.DataFrame, iteration: int, archive: Path, cfg: Eval, seed: int) -> dict:
    """For the reward and the independent judge (ROUGE-L): the change vs iteration 0 and vs the previous iteration,
    and the win rate vs iteration 0, each with its paired bootstrap interval over the held-out prompts; the reward
    change with its length-explained part removed; and the reward/judge disagreement flag. Iteration 0 compares with
    itself (Δ 0, win rate 0.5). `table` is compared as it will be archived (record.as_recorded), at the precision of
    the archived tables it is compared with: identical summaries tie."""
    now_table = record.checked(record.as_recorded(table), "the held-out table")
    initial_table = now_table if iteration == 0 else read_table(archive / "iter-0.jsonl")
    previous_table = None if iteration == 0 else read_table(archive / f"iter-{iteration - 1}.jsonl")
    for found, what in ((initial_table, "iteration-0"), (previous_table if iteration else now_table, "previous iteration's")):
        if found is None:
            log(f"evaluate: no {what} held-out table: its comparisons are left out (null)")
    interval = lambda x: st.bootstrap_interval(x, cfg.bootstrap_resamples, seed, cfg.interval_level)  # noqa: E731
    stats = {}
    for name in record.JUDGES:
        now = column(now_table, name)
        initial = None if now is None else paired(now, column_or_log(initial_table, name, "iteration-0"),
                                                  "iteration-0")
        previous = None if now is None or iteration == 0 else paired(
            now, column_or_log(previous_table, name, "previous iteration's"), "previous iteration's")
        stats.update({
            f"{name}_delta_vs_initial": None if initial is None else interval(now.to_numpy() - initial.to_numpy()),
            f"{name}_delta_vs_previous": None if previous is None else interval(now.to_numpy() - previous.to_numpy()),
            record.WIN_RATE[name]: (None if initial is None
                                    else interval(st.wins(now.to_numpy(), initial.to_numpy()))),
        })
    length_stats, (slope, r2) = length_control(now_table, initial_table, interval)
    stats.update(length_stats)
    out = {}
    for name, value in stats.items():
        out.update(zip(record.METRICS[name].columns(), value if value is not None else (None,) * 4))
    out["eval/reward_length_slope"], out["eval/reward_length_r2"] = slope, r2
    out["eval/judge_disagreement"] = judge.disagreement(stats["reward_delta_vs_initial"],
                                                        stats["rouge_l_delta_vs_initial"])
    return out


def length_control(now_table: pd.DataFrame, initial_table: pd.DataFrame | None, interval) -> tuple[dict, tuple]:
    """How much of the reward change vs iteration 0 length explains. The slope b of reward on length (tokens) is
    fitted across iteration 0's held-out prompts by least squares; a prompt's length-adjusted change is
    Δreward − b·Δlength, the change of its residual from that line. A gain that is only "shorter" or "longer" keeps
    its Δ reward but loses its adjusted Δ. The control's power is the fit's R²: near 0, length explains almost none of
    the reward across prompts, b is near 0 and the adjusted Δ equals the raw one whatever the policy did to length,
    so it is no evidence either way. Returns the intervals and (b, R²) (Nones when there is nothing to pair)."""
    none = {"length_delta_vs_initial": None, "reward_delta_vs_initial_length_adjusted": None}
    initial_reward, initial_length = column(initial_table, "reward"), column(initial_table, "length")
    if (initial_reward is None or initial_length is None or "length" not in now_table.columns
            or set(initial_reward.index) != set(now_table.index)):
        return none, (None, None)  # `paired` has already said why for the reward
    initial_reward, initial_length = initial_reward.reindex(now_table.index), initial_length.reindex(now_table.index)
    slope, r2 = st.least_squares_fit(initial_length.to_numpy(), initial_reward.to_numpy())
    d_length = now_table["length"].to_numpy(dtype=float) - initial_length.to_numpy()  # (P,)
    d_reward = now_table["reward"].to_numpy(dtype=float) - initial_reward.to_numpy()  # (P,)
    return {"length_delta_vs_initial": interval(d_length),
            "reward_delta_vs_initial_length_adjusted": interval(d_reward - slope * d_length)}, (slope, r2)


# Below this R², length explains too little of iteration 0's reward for the length-adjusted Δ to differ from the raw
# one (the adjustment is b·Δlength with b ≈ 0): it is shown as without power, not as a check passed.
LENGTH_CONTROL_MIN_R2 = 0.1


def comparison_line(metrics: dict) -> str:
    """The comparisons in one line, each with its interval (marked borderline where a bound is within its Monte-Carlo
    error of no change); those left out (null) are skipped. A contradiction between the reward and the independent
    judge ends the line in words."""
    def show(name: str, label: str) -> list[str]:
        m = record.METRICS[name]
        point, low, high, mc = (metrics.get(c) for c in m.columns())
        return [] if point is None else [f"{label} {st.interval_text(st.Interval(point, low, high, mc or 0.0), m.fmt, m.null)}"]

    r2 = metrics.get("eval/reward_length_r2")
    power = "" if r2 is None else f" (length fit R² {r2:.3f}{': no power' if r2 < LENGTH_CONTROL_MIN_R2 else ''})"
    parts = (show("win_rate_vs_initial", "win rate vs iteration 0")
             + show("reward_delta_vs_initial", "Δ reward vs iteration 0")
             + show("reward_delta_vs_previous", "vs previous")
             + [p + power for p in show("reward_delta_vs_initial_length_adjusted", "length-adjusted")]
             + show("rouge_l_delta_vs_initial", "Δ ROUGE-L vs iteration 0")
             + show("rouge_l_win_rate_vs_initial", "ROUGE-L win rate"))
    parts.append(f"repeated 3-grams {metrics['eval/repeated_3gram_fraction']:.3f}")
    if metrics.get("eval/cut_rate") is not None:
        parts.append(f"cut at the length limit {metrics['eval/cut_rate']:.2f}")
    warning = judge.disagreement_warning(metrics.get("eval/judge_disagreement"))
    return " · ".join(parts) + ("" if warning is None else f" · {warning}")


def sample_markdown(table: pd.DataFrame, metrics: dict, rows: int) -> str:
    head = (f"# Held-out samples, iteration {metrics['iteration']}\n\n"
            f"mean reward {metrics['eval/reward_mean']:.4f} · ROUGE-L {metrics['eval/rouge_l_mean']:.4f} · "
            f"KL {metrics['eval/kl_mean']:.3f} · "
            f"length {metrics['eval/length_mean']:.1f} · EOS rate {metrics['eval/eos_rate']:.2f}\n\n"
            f"{comparison_line(metrics)} (paired bootstrap intervals over the prompts)\n\n"
            "| prompt | summary | reward | ROUGE-L | reference |\n|---|---|---|---|---|\n")
    cell = lambda s, n: html.escape(" ".join(str(s).split()))[:n].replace("|", "\\|")  # noqa: E731
    lines = [f"| {cell(post_text(r.query), 300)} | {cell(r.summary, 300)} | {r.reward:.3f} | {r.rouge_l:.3f} | {cell(r.reference, 300)} |"
             for r in table.head(rows).itertuples()]
    return head + "\n".join(lines) + "\n"


def evaluate(params: Params, state_dir: Path | None = None, out_json: Path | None = None,
             out_table: Path | None = None) -> dict:
    state_dir = Path(state_dir or params.paths.next)
    metrics, table = evaluate_policy(params, state_dir)
    metrics_dir = Path(params.paths.metrics)
    write_json(out_json or metrics_dir / "eval.json", metrics)
    atomic_write_text(out_table or metrics_dir / "samples.md", sample_markdown(table, metrics, params.eval.table_rows))
    record.write_table(table, Path(out_table or metrics_dir / "samples.md").with_suffix(".jsonl"))
    log(f"evaluate: iteration {metrics['iteration']}: reward {metrics['eval/reward_mean']:.4f}, "
        f"ROUGE-L {metrics['eval/rouge_l_mean']:.4f}, KL {metrics['eval/kl_mean']:.3f}, length {metrics['eval/length_mean']:.1f}, EOS {metrics['eval/eos_rate']:.2f}; "
        + comparison_line(metrics))
    return metrics
