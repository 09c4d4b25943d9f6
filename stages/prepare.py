"""Stage `prepare`: TL;DR prompts → cleaned, tokenised, deterministically split train/eval parquet.

Source: the real TL;DR sample shipped in data/tldr/ (default) or `trl-lib/tldr` from the hub via `datasets`.
Rows that cannot be used are skipped and counted (metrics/prepare.json), never silently dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    from collections import Counter
    from pathlib import Path

    from rlhf.artifacts.files import write_json
    from rlhf.artifacts.schema import write_artifact
    from rlhf.data.prompts import clean_rows, load_source, split, tokenize_prompts
    from rlhf.models.sources import load_tokenizer
    from rlhf.runtime.log import log

    counts: Counter = Counter()
    source = load_source(params)
    counts["source_rows"] = len(source)
    df = clean_rows(source, counts)
    tokenizer = load_tokenizer(Path(params.paths.policy_model))
    df = tokenize_prompts(df, tokenizer, params, counts)
    train, evaluation = split(df, params.data.eval_size, params.data.split_seed)

    out = Path(params.paths.prepared)
    write_artifact(train, "prompts", out / "train.parquet")
    write_artifact(evaluation, "prompts", out / "eval.parquet")
    counts.update({"train_prompts": len(train), "eval_prompts": len(evaluation)})
    stats = {"prompt_tokens_mean": float(df["prompt_length"].mean()), "prompt_tokens_max": int(df["prompt_length"].max())}
    write_json(Path(params.paths.metrics) / "prepare.json", {**{k: int(v) for k, v in counts.items()}, **stats})
    log(f"prepare: {len(train)} train / {len(evaluation)} eval prompts; TL;DR cue added to {counts['added_tldr_cue']}; "
        "skipped " + ", ".join(f"{k.removeprefix('skipped_')}={v}" for k, v in sorted(counts.items())
                               if k.startswith("skipped")))


if __name__ == "__main__":
    run_stage(main)
