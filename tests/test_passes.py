"""Small helpers of the forward passes and the sampler against their definitions."""

import pytest
import torch

from rlhf.models.passes import entropy_from_logits
from rlhf.models.sampling import contains_stop


@pytest.mark.parametrize("rows_per_chunk", [1, 4, 128])
def test_entropy_from_logits_is_the_categorical_entropy_per_position(rows_per_chunk):
    logits = torch.randn(3, 7, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    want = torch.distributions.Categorical(logits=logits).entropy()  # (3, 7)
    torch.testing.assert_close(entropy_from_logits(logits, rows_per_chunk=rows_per_chunk), want)


@pytest.mark.parametrize(("response", "ended"), [([5, 6, 2], True), ([5, 6, 3], True), ([5, 2, 6], False),
                                                 ([5, 6], False), ([], False), ([3], True)])
def test_a_response_ended_only_if_its_last_token_is_any_stop_token(response, ended):
    """Qwen3's chat turn ends with <|im_end|> and its tokenizer's EOS is another id: both count (stop ids 2, 3)."""
    assert contains_stop(response, [2, 3]) is ended


def test_qwen3_stops_at_im_end_and_endoftext(tmp_path):
    """The real Qwen3 tokenizer's EOS is <|im_end|>; its generation config adds <|endoftext|>: a chat summary may end
    with either, and a response ending in one must not get the missing-EOS penalty."""
    import shutil

    from conftest import ROOT
    from rlhf.models.sources import load_tokenizer, stop_token_ids

    qwen3 = ROOT / "models/configs/qwen3-0.6b"
    tokenizer = load_tokenizer(qwen3)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert stop_token_ids(tokenizer, qwen3) == sorted([im_end, endoftext])
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):  # without a generation config: EOS only
        shutil.copy2(qwen3 / name, tmp_path / name)
    assert stop_token_ids(tokenizer, tmp_path) == [tokenizer.eos_token_id] == [im_end]
