"""TL;DR prompts: load the source, clean it (rows that cannot be used are skipped and counted), render and tokenise
the prompts, split train/eval deterministically, and pick an iteration's batch."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from rlhf.artifacts.schema import ArtifactError
from rlhf.config.params import Params
from rlhf.errors import ModelError

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
TEXT_COLUMNS = ("prompt", "completion", "subreddit")
CUE = "TL;DR:"
# The post of a trl-lib prompt: after its first "POST:", without the closing cue (the whole prompt if no "POST:").
_POST = re.compile(r"POST:(.*?)(?:TL;DR:\s*)?$", re.S)
_LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter


def load_source(params: Params) -> pd.DataFrame:
    if params.data.source == "local":
        path = Path(params.paths.source_data)
        if not path.exists():
            raise ArtifactError(f"{path}: source data not found (paths.source_data)")
        try:
            return pd.read_parquet(path)
        except (pa.ArrowException, OSError) as err:  # a file named .parquet that is not one, or a truncated one
            raise ArtifactError(f"{path}: not a readable parquet file ({str(err).splitlines()[0]})") from None
    try:
        import datasets

        return datasets.load_dataset(params.data.source, split=params.data.split).to_pandas()
    except Exception as err:
        raise ArtifactError(f"cannot load dataset {params.data.source!r} from the hub: {str(err).splitlines()[0]}") from None


def clean_text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return _CONTROL.sub("", str(value))


def check_text_columns(df: pd.DataFrame) -> None:
    """Text columns hold strings (bytes are decoded, missing values are counted skips); anything else, such as an
    integer `prompt` column, is a source that was built wrong, so stop instead of turning numbers into prompts."""
    for col in (c for c in TEXT_COLUMNS if c in df.columns):
        values = df[col].tolist()
        bad = [i for i, v in enumerate(values) if not (_is_missing(v) or isinstance(v, (str, bytes)))]
        if bad:
            sample = ", ".join(f"row {i}: {values[i]!r}" for i in bad[:3])
            raise ArtifactError(f"source data column {col!r} must hold text, but {len(bad)} of {len(values)} rows "
                                f"hold {type(values[bad[0]]).__name__} values ({sample})")


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def post_text(query: str) -> str:
    match = _POST.search(query)
    return match.group(1) if match else query.removesuffix(CUE)


def clean_rows(df: pd.DataFrame, counts: Counter) -> pd.DataFrame:
    """Normalise text, drop rows with no usable prompt, post or reference, give every prompt the TL;DR cue,
    de-duplicate prompts (first one wins)."""
    for col in ("prompt", "completion"):
        if col not in df.columns:
            raise ArtifactError(f"source data has no {col!r} column (columns: {list(df.columns)})")
    if len(df) == 0:
        raise ArtifactError("source data is empty")
    check_text_columns(df)
    out = pd.DataFrame({
        "prompt_id": df["source_index"].astype("int64") if "source_index" in df.columns else np.arange(len(df)),
        "subreddit": df["subreddit"].map(clean_text) if "subreddit" in df.columns else "",
        "query": df["prompt"].map(clean_text),
        "reference": df["completion"].map(clean_text),
    })
    no_prompt = out["query"].isna() | (out["query"].fillna("").str.strip() == "")
    post = out["query"].fillna("").map(post_text)
    post_empty = ~no_prompt & (post.str.strip() == "")
    # A post with no letter at all (the real sample has one that is just "*") gives nothing to summarise.
    no_letters = ~no_prompt & ~post_empty & ~post.str.contains(_LETTER)
    no_ref = out["reference"].isna() | (out["reference"].fillna("").str.strip() == "")
    counts["skipped_empty_prompt"] += int(no_prompt.sum())
    counts["skipped_empty_post"] += int(post_empty.sum())
    counts["skipped_post_without_letters"] += int(no_letters.sum())
    counts["skipped_missing_reference"] += int((no_ref & ~no_prompt & ~post_empty & ~no_letters).sum())
    out = out[~(no_prompt | post_empty | no_letters | no_ref)]
    # A prompt without the cue is given it rather than skipped: its post and reference are as good as any, and the
    # cue is only the layout's last line, the point the policy continues from. Skipping would also silently empty a
    # source whose prompts all lack it. Counted (added_tldr_cue) so the change is visible in metrics/prepare.json.
    no_cue = ~out["query"].str.rstrip().str.endswith(CUE)
    counts["added_tldr_cue"] += int(no_cue.sum())
    out.loc[no_cue, "query"] = out.loc[no_cue, "query"].str.rstrip() + "\n\n" + CUE
    dup = out["query"].duplicated(keep="first")
    counts["skipped_duplicate_prompt"] += int(dup.sum())
    out = out[~dup]
    dup_id = out["prompt_id"].duplicated(keep="first")
    counts["skipped_duplicate_id"] += int(dup_id.sum())
    return out[~dup_id].reset_index(drop=True)


def check_prompt_format(tokenizer, prompt_format: str) -> None:
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"policy_model.prompt_format: chat needs a chat template, and the tokenizer in "
                         f"{tokenizer.name_or_path} has none; use prompt_format: raw")


def render_prompt(tokenizer, query: str, prompt_format: str, instruction: str | None = None) -> str:
    if instruction is not None:
        # str.replace, not str.format: posts contain braces
        query = instruction.replace("{post}", query.rstrip().removesuffix(CUE).rstrip())
    if prompt_format == "raw":
        return query
    messages = [{"role": "user", "content": query}]
    # enable_thinking=False is Qwen3's switch; other templates ignore unknown variables.
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)


def trim_query(tokenizer, query: str, render, limit: int) -> tuple[str, list[int]] | None:
    """Cut the source prompt from its start until the rendered prompt fits in `limit` tokens: the instruction, the
    chat template and the cue at the end stay whole. None if not even the frame around the post fits."""
    query_ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    keep = len(query_ids)
    while keep > 0:
        text = render(tokenizer.decode(query_ids[-keep:]))
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) <= limit:
            return text, tokens
        keep -= len(tokens) - limit  # decoded text may re-tokenise differently: loop until it fits
    return None


def tokenize_prompts(df: pd.DataFrame, tokenizer, params: Params, counts: Counter) -> pd.DataFrame:
    limit, how = params.data.max_prompt_tokens, params.data.overlong
    fmt, instruction = params.policy_model.prompt_format, params.policy_model.instruction
    check_prompt_format(tokenizer, fmt)

    def render(query: str) -> str:
        return render_prompt(tokenizer, query, fmt, instruction)

    keep, prompts, ids = [], [], []
    for query in df["query"]:
        text = render(query)
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) > limit:
            fitted = trim_query(tokenizer, query, render, limit) if how == "truncate" else None
            counts["truncated_overlong" if fitted else "skipped_overlong"] += 1
            if fitted is None:
                keep.append(False)
                continue
            text, tokens = fitted
        keep.append(True)
        prompts.append(text)
        ids.append(tokens)
    df = df[np.array(keep, dtype=bool)].reset_index(drop=True)
    return df.assign(prompt=prompts, prompt_ids=ids, prompt_length=np.array([len(t) for t in ids], dtype="int32"))


def split(df: pd.DataFrame, eval_size: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if len(df) <= eval_size:
        raise ArtifactError(f"only {len(df)} usable prompts, need more than data.eval_size = {eval_size}")
    order = np.random.default_rng(seed).permutation(len(df))
    return df.iloc[np.sort(order[eval_size:])].reset_index(drop=True), df.iloc[np.sort(order[:eval_size])].reset_index(drop=True)


def sample_batch(train: pd.DataFrame, batch_size: int, seed: int, iteration: int) -> pd.DataFrame:
    if len(train) < batch_size:
        raise ArtifactError(f"only {len(train)} training prompts, fewer than rollout.batch_size = {batch_size}")
    rng = np.random.default_rng([seed, iteration])
    rows = np.sort(rng.choice(len(train), size=batch_size, replace=False))
    return train.iloc[rows].reset_index(drop=True)
