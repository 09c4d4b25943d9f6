"""The parquet artifacts: columns, dtypes and invariants. This module is the contract between stages.

Every row is one prompt/response. Token sequences are stored unpadded (list columns), so no artifact depends on a
pad id, and per-token columns of one row always have `response_length` entries. Files carry a schema version in
their metadata and are validated on read; a problem raises ArtifactError naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf.artifacts.files import atomic_write_bytes
from rlhf.errors import ArtifactError  # noqa: F401 - raised here, part of this module's contract

SCHEMA_VERSION = "1"
_META_KEY = b"rlhf_dvc.schema"
_VERSION_KEY = b"rlhf_dvc.schema_version"

_ids = pa.list_(pa.int32())
_floats = pa.list_(pa.float32())

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("subreddit", pa.string()),
        ("prompt", pa.string()),  # the text the policy sees (raw trl-lib layout or chat-rendered)
        ("query", pa.string()),  # the trl-lib prompt, what a reward model is shown as the user turn
        ("reference", pa.string()),  # human reference summary
        ("prompt_ids", _ids),
        ("prompt_length", pa.int32()),
    ]
)

ROLLOUT = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("micro_batch", pa.int32()),  # fixed length-sorted groups reused by every later forward pass
        ("query", pa.string()),
        ("reference", pa.string()),
        ("prompt_ids", _ids),
        ("response_ids", _ids),  # up to and including the first stop token; nothing after it
        ("response_text", pa.string()),
        ("response_length", pa.int32()),
        ("contains_eos", pa.bool_()),
        ("logprobs", _floats),  # log π_old(a_t | s_t) at the sampling temperature
        ("entropy", _floats),  # entropy of π_old(· | s_t)
    ]
)

SCORES = pa.schema([("prompt_id", pa.int64()), ("score", pa.float32())])

REFERENCE = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("ref_logprobs", _floats),  # log π_ref(a_t | s_t)
        ("values", _floats),  # V_old(s_t) from the critic
    ]
)

ADVANTAGES = pa.schema(
    [
        ("prompt_id", pa.int64()),
        ("score", pa.float32()),  # after the missing-EOS penalty
        ("kl", _floats),
        ("rewards", _floats),
        ("advantages", _floats),
        ("returns", _floats),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "rollout": ROLLOUT,
    "scores": SCORES,
    "reference": REFERENCE,
    "advantages": ADVANTAGES,
}

PER_TOKEN = {
    "rollout": ("response_ids", "logprobs", "entropy"),
    "reference": ("ref_logprobs", "values"),
    "advantages": ("kl", "rewards", "advantages", "returns"),
}


def write_artifact(df: pd.DataFrame, kind: str, path: str | Path) -> None:
    """Validate `df` against the schema of `kind` and write it atomically (temp file + rename)."""
    schema = SCHEMAS[kind]
    missing = [n for n in schema.names if n not in df.columns]
    if missing:
        raise ArtifactError(f"{path}: cannot write {kind} artifact, missing columns {missing}")
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    table = table.replace_schema_metadata({_META_KEY: kind.encode(), _VERSION_KEY: SCHEMA_VERSION.encode()})
    _check_lengths(table.to_pandas(), kind, path)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_artifact(path: str | Path, kind: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing {kind} artifact (run the stage that writes it)")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for truncated/corrupt files
        raise ArtifactError(f"{path}: unreadable parquet ({err})") from None
    meta = table.schema.metadata or {}
    if meta.get(_META_KEY, b"").decode() != kind:
        raise ArtifactError(f"{path}: expected a {kind} artifact, found {meta.get(_META_KEY, b'<none>').decode()!r}")
    if meta.get(_VERSION_KEY, b"").decode() != SCHEMA_VERSION:
        raise ArtifactError(f"{path}: schema version {meta.get(_VERSION_KEY)!r}, this code reads {SCHEMA_VERSION}")
    expected = SCHEMAS[kind]
    for field in expected:
        if field.name not in table.schema.names:
            raise ArtifactError(f"{path}: missing column {field.name!r}")
        if table.schema.field(field.name).type != field.type:
            raise ArtifactError(
                f"{path}: column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}"
            )
    df = table.to_pandas()
    _check_lengths(df, kind, path)
    return df


def check_token_ids(df: pd.DataFrame, path: str | Path, vocab_size: int) -> None:
    """Every prompt/response token id indexes the model's embedding: a model stage calls this once the model is
    loaded, so a file from another tokenizer stops with its row instead of an index error deep in a forward pass."""
    for col in ("prompt_ids", "response_ids"):
        if col in df.columns:
            bad = [i for i, ids in enumerate(df[col]) if len(ids) and (min(ids) < 0 or max(ids) >= vocab_size)]
            if bad:
                raise ArtifactError(f"{path}: {col} of row {bad[0]} holds a token id outside the model's "
                                    f"vocabulary [0, {vocab_size})")


def _check_lengths(df: pd.DataFrame, kind: str, path: str | Path) -> None:
    cols = PER_TOKEN.get(kind, ())
    if not cols:
        return
    if "response_length" in df.columns:
        ref, expected = "response_length", [int(n) for n in df["response_length"]]
    else:
        ref, expected = cols[0], [len(v) for v in df[cols[0]]]
    for col in cols:
        for i, (values, n) in enumerate(zip(df[col], expected)):
            if len(values) != n:
                raise ArtifactError(f"{path}: row {i} has {len(values)} {col} entries but {ref} says {n}")


def check_aligned(path_a: str | Path, a: pd.DataFrame, path_b: str | Path, b: pd.DataFrame) -> None:
    """Two artifacts of one iteration must describe the same rows in the same order."""
    if len(a) != len(b) or not (a["prompt_id"].to_numpy() == b["prompt_id"].to_numpy()).all():
        raise ArtifactError(f"{path_b}: rows do not match {path_a} ({len(b)} vs {len(a)} rows or different order)")


def read_iteration(folder: str | Path, kinds: tuple[str, ...]) -> list[pd.DataFrame]:
    """Read `<folder>/<kind>.parquet` for each kind (scores → scores.parquet, ...) and check that every artifact
    describes the same rows in the same order as the first."""
    folder = Path(folder)
    paths = [folder / f"{kind}.parquet" for kind in kinds]
    frames = [read_artifact(path, kind) for path, kind in zip(paths, kinds)]
    for path, frame in zip(paths[1:], frames[1:]):
        check_aligned(paths[0], frames[0], path, frame)
    return frames
