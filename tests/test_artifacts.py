"""The parquet contract between stages (rlhf/artifacts/schema.py): every malformed file stops the reader with one
error naming the file and what is wrong, and a model stage refuses token ids its model cannot embed."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import copy_repo, run, stage
from rlhf.artifacts.schema import (
    _META_KEY, _VERSION_KEY, REFERENCE, SCHEMA_VERSION, check_token_ids, read_artifact, read_iteration, write_artifact,
)
from rlhf.errors import ArtifactError


def reference_frame(ids=(1, 2, 3), lengths=(2, 1, 3)) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": list(ids),
                         "ref_logprobs": [[-0.5] * n for n in lengths],
                         "values": [[0.1] * n for n in lengths]})


def write_raw(df: pd.DataFrame, path, version: str = SCHEMA_VERSION, **types: pa.DataType) -> None:
    """A reference file written past write_artifact's checks, as a foreign tool or a broken stage would: the
    contract's column types unless `types` says otherwise."""
    schema = pa.schema([(c, types[c]) if c in types else REFERENCE.field(c) for c in df.columns])
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({_META_KEY: b"reference", _VERSION_KEY: version.encode()}), path)


def test_a_written_artifact_reads_back_unchanged(tmp_path):
    df = reference_frame()
    write_artifact(df, "reference", tmp_path / "r.parquet")
    back = read_artifact(tmp_path / "r.parquet", "reference")
    assert back["prompt_id"].tolist() == [1, 2, 3]
    assert [list(v) for v in back["values"]] == [[pytest.approx(0.1)] * n for n in (2, 1, 3)]


def test_a_missing_file_names_the_stage_to_run(tmp_path):
    with pytest.raises(ArtifactError, match=r"r\.parquet: missing reference artifact \(run the stage"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_a_file_that_is_not_parquet_is_unreadable(tmp_path):
    (tmp_path / "r.parquet").write_text("prompt_id,values\n1,0.1\n")
    with pytest.raises(ArtifactError, match=r"r\.parquet: unreadable parquet"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_an_artifact_of_another_kind_is_refused(tmp_path):
    write_artifact(pd.DataFrame({"prompt_id": [1], "score": [0.5]}), "scores", tmp_path / "r.parquet")
    with pytest.raises(ArtifactError, match="expected a reference artifact, found 'scores'"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_a_plain_parquet_without_our_metadata_is_refused(tmp_path):
    reference_frame().to_parquet(tmp_path / "r.parquet")
    with pytest.raises(ArtifactError, match="expected a reference artifact, found '<none>'"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_another_schema_version_is_refused(tmp_path):
    write_raw(reference_frame(), tmp_path / "r.parquet", version="0")
    with pytest.raises(ArtifactError, match=f"schema version b?'0', this code reads {SCHEMA_VERSION}"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_a_missing_column_is_named(tmp_path):
    write_raw(reference_frame().drop(columns="values"), tmp_path / "r.parquet")
    with pytest.raises(ArtifactError, match="missing column 'values'"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_a_column_of_the_wrong_type_is_named(tmp_path):
    df = reference_frame()
    df["prompt_id"] = df["prompt_id"].astype(str)
    write_raw(df, tmp_path / "r.parquet", prompt_id=pa.string())
    with pytest.raises(ArtifactError, match="column 'prompt_id' has type string, expected int64"):
        read_artifact(tmp_path / "r.parquet", "reference")


def test_per_token_columns_of_different_lengths_are_refused_on_read_and_on_write(tmp_path):
    df = reference_frame()
    df.at[1, "values"] = [0.1, 0.2]  # ref_logprobs of row 1 has 1 entry
    write_raw(df, tmp_path / "r.parquet")
    with pytest.raises(ArtifactError, match="row 1 has 2 values entries but ref_logprobs says 1"):
        read_artifact(tmp_path / "r.parquet", "reference")
    with pytest.raises(ArtifactError, match="row 1 has 2 values entries"):
        write_artifact(df, "reference", tmp_path / "w.parquet")
    assert not (tmp_path / "w.parquet").exists()


def test_writing_without_a_column_names_it(tmp_path):
    with pytest.raises(ArtifactError, match=r"missing columns \['values'\]"):
        write_artifact(reference_frame().drop(columns="values"), "reference", tmp_path / "r.parquet")


@pytest.mark.parametrize("other_ids", [(1, 3, 2), (1, 2)])
def test_artifacts_of_one_iteration_must_hold_the_same_rows_in_order(tmp_path, other_ids):
    write_artifact(reference_frame(), "reference", tmp_path / "reference.parquet")
    write_artifact(pd.DataFrame({"prompt_id": list(other_ids), "score": [0.5] * len(other_ids)}), "scores",
                   tmp_path / "scores.parquet")
    with pytest.raises(ArtifactError, match=r"scores\.parquet: rows do not match .*reference\.parquet"):
        read_iteration(tmp_path, ("reference", "scores"))


@pytest.mark.parametrize(("column", "ids", "row"), [("prompt_ids", [[1, 2], [3, 16]], 1),
                                                    ("response_ids", [[-1], [3]], 0)])
def test_token_ids_outside_the_vocabulary_are_named_by_row(column, ids, row):
    df = pd.DataFrame({column: ids})
    with pytest.raises(ArtifactError, match=f"x.parquet: {column} of row {row} holds a token id outside the "
                                            r"model's vocabulary \[0, 16\)"):
        check_token_ids(df, "x.parquet", vocab_size=16)
    check_token_ids(pd.DataFrame({column: [[0, 15], []]}), "x.parquet", vocab_size=16)  # the edges are fine


def test_a_rollout_from_another_tokenizer_stops_the_reference_stage_in_one_line(tmp_path, trained_repo):
    """The tiny model's vocabulary is that of the real Qwen3 tokenizer; an id past it would otherwise be an index
    error inside the embedding."""
    repo = copy_repo(trained_repo, tmp_path / "repo")
    path = repo / "data/iteration/rollout.parquet"
    df = read_artifact(path, "rollout")
    df.at[2, "response_ids"] = [10_000_000] + list(df.at[2, "response_ids"])[1:]
    write_artifact(df, "rollout", path)
    out = repo / "data/iteration/reference.parquet"
    before = out.read_bytes()
    result = run(stage("reference"), repo, check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "rollout.parquet: response_ids of row 2 holds a token id outside the model's vocabulary" in last
    assert out.read_bytes() == before
