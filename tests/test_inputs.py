"""Bad inputs that only show up in the data file or against the model: each one is a single `error:` line naming what
is wrong (exit code 2, nothing written), or a counted change in metrics/prepare.json."""

import json
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, full_params, run, stage, tiny_params
from rlhf.artifacts.schema import ArtifactError
from rlhf.config.params import parse_params
from rlhf.data.prompts import clean_rows, load_source, tokenize_prompts
from rlhf.errors import ModelError


def prompt(post: str) -> str:
    return f"SUBREDDIT: r/test\n\nTITLE: A title\n\nPOST: {post}\n\nTL;DR:"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "models/configs/qwen3-0.6b")


def project(tmp_path: Path, policy: Path | None, params: dict) -> Path:
    """Just enough of a project for one stage or command: params.yaml, the source data, optionally the base policy."""
    params["runtime"]["warm_start"] = False  # one short run each: starting a warm process would cost more
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    data = tmp_path / "data" / "tldr"
    data.mkdir(parents=True)
    pd.read_parquet(ROOT / "data/tldr/validation-1945.parquet").head(20).to_parquet(data / "validation-1945.parquet")
    if policy is not None:  # as the policy_model stage leaves it, with the record of what it holds
        base = tmp_path / "models" / "base" / "policy"
        shutil.copytree(policy, base)
        source = {"id": params["policy_model"]["id"], "revision": params["policy_model"].get("revision")}
        (base / "source.json").write_text(json.dumps(source))
    return tmp_path


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---- the source file ------------------------------------------------------------------------------------------------

def test_a_parquet_name_on_a_text_file_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "posts.parquet"
    bad.write_text("prompt,completion\nhello,world\n")
    params = parse_params(full_params(paths={"source_data": str(bad.relative_to(tmp_path))}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        with pytest.raises(ArtifactError, match=r"posts\.parquet: not a readable parquet file"):
            load_source(params)


def test_a_parquet_name_on_a_text_file_fails_the_prepare_stage_cleanly(tmp_path, tiny_policy, tiny_reward):
    repo = project(tmp_path, None, tiny_params(tiny_policy, tiny_reward))
    (repo / "data/tldr/validation-1945.parquet").write_bytes(b"not parquet at all\n" * 10)
    line = one_error_line(run(stage("prepare"), repo, check=False))
    assert "data/tldr/validation-1945.parquet" in line and "Traceback" not in line
    assert not (repo / "data" / "prepared").exists()


@pytest.mark.parametrize("column", ["prompt", "completion", "subreddit"])
def test_a_text_column_of_numbers_is_an_error_naming_column_and_rows(column):
    df = pd.DataFrame({"prompt": [prompt("a"), prompt("b"), prompt("c")], "completion": [" x", " y", " z"],
                       "subreddit": ["a", "b", "c"]})
    df[column] = [7, 8, 9]
    with pytest.raises(ArtifactError, match=rf"column '{column}' must hold text.*3 of 3 rows hold int.*row 0: 7"):
        clean_rows(df, Counter())


def test_one_bad_value_among_strings_is_named_by_its_row():
    df = pd.DataFrame({"prompt": [prompt("a"), 12.5, prompt("c")], "completion": [" x", " y", " z"]})
    with pytest.raises(ArtifactError, match=r"'prompt' must hold text, but 1 of 3 rows hold float values \(row 1: 12\.5\)"):
        clean_rows(df, Counter())


def test_missing_values_in_text_columns_stay_counted_skips():
    df = pd.DataFrame({"prompt": [prompt("a"), None, prompt("c")], "completion": [" x", " y", float("nan")]})
    counts = Counter()
    out = clean_rows(df, counts)
    assert len(out) == 1 and counts["skipped_empty_prompt"] == 1 and counts["skipped_missing_reference"] == 1


# ---- the TL;DR cue ----------------------------------------------------------------------------------------------------

def test_a_prompt_without_the_cue_gets_it_and_is_counted():
    no_cue = "SUBREDDIT: r/test\n\nTITLE: A title\n\nPOST: my cat sleeps all day  \n"
    counts = Counter()
    out = clean_rows(pd.DataFrame({"prompt": [no_cue, prompt("kept as is")], "completion": [" a", " b"]}), counts)
    assert list(out["query"]) == [no_cue.rstrip() + "\n\nTL;DR:", prompt("kept as is")]
    assert counts["added_tldr_cue"] == 1


def test_a_cue_followed_by_a_space_is_left_alone():
    spaced = prompt("post") + " "
    counts = Counter()
    out = clean_rows(pd.DataFrame({"prompt": [spaced], "completion": [" a"]}), counts)
    assert out.at[0, "query"] == spaced and counts["added_tldr_cue"] == 0


def test_the_added_cue_is_what_prepare_reports(tmp_path, tiny_policy, tiny_reward):
    repo = project(tmp_path, tiny_policy, tiny_params(tiny_policy, tiny_reward))
    src = repo / "data/tldr/validation-1945.parquet"
    df = pd.read_parquet(src)
    df.loc[:2, "prompt"] = df.loc[:2, "prompt"].str.removesuffix("TL;DR:")
    df.to_parquet(src)
    result = run(stage("prepare"), repo)
    metrics = json.loads((repo / "metrics" / "prepare.json").read_text())
    assert metrics["added_tldr_cue"] == 3 and metrics["skipped_post_without_letters"] == 0
    assert "TL;DR cue added to 3" in result.stderr + result.stdout
    prepared = pd.concat([pd.read_parquet(repo / "data/prepared" / f) for f in ("train.parquet", "eval.parquet")])
    assert prepared["query"].str.endswith("\n\nTL;DR:").all()  # the cleaned source prompt; the policy sees it via the instruction


# ---- near-empty posts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("post", ["*", "...", "  - ", "123 456 !!", "🙂🙂"])
def test_a_post_without_letters_is_a_counted_skip(post):
    counts = Counter()
    out = clean_rows(pd.DataFrame({"prompt": [prompt(post), prompt("real words")], "completion": [" a", " b"]}),
                     counts)
    assert list(out["query"]) == [prompt("real words")]
    assert counts["skipped_post_without_letters"] == 1 and counts["skipped_empty_post"] == 0


@pytest.mark.parametrize("post", ["x", "Привет всем", "日本語", "I'm 22*"])
def test_a_short_or_non_latin_post_is_kept(post):
    counts = Counter()
    out = clean_rows(pd.DataFrame({"prompt": [prompt(post)], "completion": [" a"]}), counts)
    assert len(out) == 1 and sum(v for k, v in counts.items() if k.startswith("skipped")) == 0


def test_the_title_does_not_make_an_empty_post_usable():
    counts = Counter()
    clean_rows(pd.DataFrame({"prompt": [prompt("*"), prompt("words")], "completion": [" a", " b"]}), counts)
    assert counts["skipped_post_without_letters"] == 1  # "TITLE: A title" has letters; only the post counts


# ---- checks against the model -------------------------------------------------------------------------------------

def test_chat_format_without_a_chat_template_is_a_model_error(tokenizer):
    params = parse_params(full_params(policy_model={"prompt_format": "chat"}))
    df = clean_rows(pd.DataFrame({"prompt": [prompt("post")], "completion": [" s"]}), Counter())
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ModelError, match="policy_model.prompt_format: chat needs a chat template"):
            tokenize_prompts(df, tokenizer, params, Counter())
    finally:
        tokenizer.chat_template = saved


def test_chat_format_without_a_chat_template_stops_prepare_in_one_line(tmp_path, tiny_policy, tiny_reward):
    repo = project(tmp_path, tiny_policy, tiny_params(tiny_policy, tiny_reward, policy_model={"prompt_format": "chat"}))
    config_file = repo / "models/base/policy/tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template")
    config_file.write_text(json.dumps(config))
    line = one_error_line(run(stage("prepare"), repo, check=False))
    assert "policy_model.prompt_format: chat needs a chat template" in line and "models/base/policy" in line
    assert not (repo / "data" / "prepared").exists() and not (repo / "metrics" / "prepare.json").exists()


def test_unknown_lora_target_stops_init_in_one_line(tmp_path, tiny_policy, tiny_reward):
    params = tiny_params(tiny_policy, tiny_reward, lora={"target_modules": ["q_proj", "nonexistent_proj"]})
    repo = project(tmp_path, tiny_policy, params)
    line = one_error_line(run(["rlhf", "init", "--no-baseline"], repo, check=False))  # no reward model here
    assert line.startswith("error: lora.target_modules: nonexistent_proj not in the model; its linear modules: ")
    assert line.split("its linear modules: ")[1].split(", ")[:7] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert not (repo / "models" / "current").exists()
    assert not list((repo / "models").glob(".current*"))  # no temporary folder left behind either


def test_unknown_lora_target_stops_loading_a_state(trained_repo, monkeypatch):
    from rlhf.models.checkpoint import load_actors

    monkeypatch.chdir(trained_repo)
    raw = yaml.safe_load((trained_repo / "params.yaml").read_text())
    raw["lora"]["target_modules"] = ["c_attn"]  # GPT-2's name; this is a Qwen3
    with pytest.raises(ModelError, match="lora.target_modules: c_attn not in the model"):
        load_actors(parse_params(raw), Path("models/current"), trainable=False)


def test_dotted_lora_targets_match_as_in_peft(tiny_policy):
    from rlhf.models.checkpoint import check_target_modules
    from rlhf.models.sources import load_causal_lm

    model = load_causal_lm(tiny_policy, "float32")
    check_target_modules(model, ["self_attn.q_proj", "mlp.down_proj"])
    with pytest.raises(ModelError, match="mlp.q_proj not in the model"):
        check_target_modules(model, ["mlp.q_proj"])
