"""Bad input data: every case is either a counted, reported skip or a clear error."""

from collections import Counter

import pandas as pd
import pytest

from conftest import ROOT, full_params
from rlhf.config.params import ParamsError, parse_params
from rlhf.data.prompts import clean_rows, sample_batch, split, tokenize_prompts
from rlhf.artifacts.schema import ArtifactError


def prompt(post: str, title: str = "A title") -> str:
    return f"SUBREDDIT: r/test\n\nTITLE: {title}\n\nPOST: {post}\n\nTL;DR:"


def frame(rows):
    return pd.DataFrame(rows, columns=["prompt", "completion"])


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ROOT / "models/configs/qwen3-0.6b")


def test_empty_dataset_is_an_error():
    with pytest.raises(ArtifactError, match="empty"):
        clean_rows(frame([]), Counter())


def test_missing_column_is_an_error():
    with pytest.raises(ArtifactError, match="'completion'"):
        clean_rows(pd.DataFrame({"prompt": [prompt("x")]}), Counter())


@pytest.mark.parametrize("bad,counter", [
    (prompt(""), "skipped_empty_post"),
    (prompt("   \n  "), "skipped_empty_post"),
    ("   ", "skipped_empty_prompt"),
    (None, "skipped_empty_prompt"),
])
def test_empty_prompts_are_counted_skips(bad, counter):
    counts = Counter()
    out = clean_rows(frame([[bad, " summary"], [prompt("fine"), " ok"]]), counts)
    assert len(out) == 1 and counts[counter] == 1


@pytest.mark.parametrize("completion", [None, "", "   "])
def test_missing_reference_is_a_counted_skip(completion):
    counts = Counter()
    out = clean_rows(frame([[prompt("post"), completion], [prompt("other"), " ok"]]), counts)
    assert len(out) == 1 and counts["skipped_missing_reference"] == 1


def test_duplicate_prompts_keep_the_first():
    counts = Counter()
    out = clean_rows(frame([[prompt("same"), " a"], [prompt("same"), " b"], [prompt("new"), " c"]]), counts)
    assert list(out["reference"]) == [" a", " c"] and counts["skipped_duplicate_prompt"] == 1


def test_duplicate_source_ids_keep_the_first():
    """prompt_id keys the held-out comparisons and the SFT record: two posts must never share one."""
    counts = Counter()
    rows = frame([[prompt("one"), " a"], [prompt("two"), " b"], [prompt("three"), " c"]]).assign(source_index=[7, 7, 9])
    out = clean_rows(rows, counts)
    assert list(out["prompt_id"]) == [7, 9] and list(out["reference"]) == [" a", " c"]
    assert counts["skipped_duplicate_id"] == 1 and counts["skipped_duplicate_prompt"] == 0


def test_control_characters_and_bad_bytes_are_cleaned():
    counts = Counter()
    raw = prompt("bell\x07 and nul\x00 ok").encode() + b" \xff\xfe broken"
    out = clean_rows(frame([[raw, " sum\x1bmary"]]), counts)
    assert "\x07" not in out.at[0, "query"] and "\x00" not in out.at[0, "query"]
    assert "\ufffd" in out.at[0, "query"] and out.at[0, "reference"] == " summary"


def test_overlong_post_dropped_or_truncated_keeping_the_cue(tokenizer):
    long = prompt("word " * 3000)
    base = parse_params(full_params(data={"max_prompt_tokens": 64}))
    counts = Counter()
    df = clean_rows(frame([[long, " s"], [prompt("short"), " s"]]), counts)
    kept = tokenize_prompts(df, tokenizer, base, counts)
    assert len(kept) == 1 and counts["skipped_overlong"] == 1
    trunc = parse_params(full_params(data={"max_prompt_tokens": 64, "overlong": "truncate"}))
    counts = Counter()
    out = tokenize_prompts(clean_rows(frame([[long, " s"]]), counts), tokenizer, trunc, counts)
    assert 60 <= out.at[0, "prompt_length"] <= 64 and counts["truncated_overlong"] == 1
    assert tokenizer.decode(out.at[0, "prompt_ids"]) == out.at[0, "prompt"]  # the text is what the policy is given
    assert out.at[0, "prompt"].endswith("One-sentence summary:<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert out.at[0, "prompt"].startswith("<|im_start|>user\nSummarize the following Reddit post")  # instruction kept
    raw = parse_params(full_params(data={"max_prompt_tokens": 64, "overlong": "truncate"},
                                   policy_model={"prompt_format": "raw", "instruction": None}))
    out = tokenize_prompts(clean_rows(frame([[long, " s"]]), Counter()), tokenizer, raw, Counter())
    assert out.at[0, "prompt"].endswith("word \n\nTL;DR:") and out.at[0, "prompt_length"] <= 64
    tiny = parse_params(full_params(data={"max_prompt_tokens": 8, "overlong": "truncate"}))
    counts = Counter()
    assert len(tokenize_prompts(clean_rows(frame([[long, " s"]]), counts), tokenizer, tiny, counts)) == 0
    assert counts["skipped_overlong"] == 1  # not even the instruction fits: skipped, counted


def test_real_sample_quirks_star_post_is_a_counted_skip(tokenizer):
    real = pd.read_parquet(ROOT / "data/tldr/validation-1945.parquet")
    star = real[real["post"].str.strip() == "*"]
    assert len(star) == 1
    counts = Counter()
    out = clean_rows(real, counts)
    assert star["source_index"].iloc[0] not in set(out["prompt_id"])  # a post that is just "*": nothing to summarise
    assert counts["skipped_post_without_letters"] == 1 and counts["added_tldr_cue"] == 0
    assert len(out) == len(real) - 1 and sum(v for k, v in counts.items() if k.startswith("skipped")) == 1


def test_instruction_wraps_the_post_without_its_cue(tokenizer):
    params = parse_params(full_params(policy_model={"prompt_format": "raw", "instruction": "Sum up {post} now: {x}"}))
    out = tokenize_prompts(clean_rows(frame([[prompt("a {brace} post"), " s"]]), Counter()), tokenizer, params,
                           Counter())
    assert out.at[0, "prompt"].startswith("Sum up SUBREDDIT: r/test") and out.at[0, "prompt"].endswith(
        "a {brace} post now: {x}")  # no TL;DR: cue inside, braces in the post and the template left alone
    for bad in ("no placeholder", "{post} twice {post}"):
        with pytest.raises(ParamsError, match="policy_model.instruction: .*{post}"):
            parse_params(full_params(policy_model={"instruction": bad}))


def test_chat_prompt_format_uses_qwen3_template_without_thinking(tokenizer):
    params = parse_params(full_params(policy_model={"prompt_format": "chat", "instruction": None}))
    df = clean_rows(frame([[prompt("post"), " s"]]), Counter())
    out = tokenize_prompts(df, tokenizer, params, Counter())
    text = out.at[0, "prompt"]
    assert text.startswith("<|im_start|>user\nSUBREDDIT: r/test")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_split_is_disjoint_complete_and_seeded():
    df = pd.DataFrame({"prompt_id": range(50)})
    train, held_out = split(df, 8, seed=3)
    assert len(held_out) == 8 and len(train) == 42
    assert set(train["prompt_id"]).isdisjoint(held_out["prompt_id"])
    assert set(train["prompt_id"]) | set(held_out["prompt_id"]) == set(range(50))
    assert split(df, 8, seed=3)[1].equals(held_out)
    assert not split(df, 8, seed=4)[1].equals(held_out)


def test_each_iteration_samples_its_own_batch_and_the_same_one_again():
    train = pd.DataFrame({"prompt_id": range(100)})
    batches = [list(sample_batch(train, 16, seed=42, iteration=i)["prompt_id"]) for i in range(4)]
    assert all(len(set(b)) == 16 for b in batches)  # no prompt twice in one batch
    assert len({tuple(b) for b in batches}) == 4  # every iteration its own
    assert list(sample_batch(train, 16, seed=42, iteration=2)["prompt_id"]) == batches[2]  # a rerun: the same
    assert list(sample_batch(train, 16, seed=7, iteration=2)["prompt_id"]) != batches[2]
