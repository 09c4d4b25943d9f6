"""Each transformers internal the package patches or leans on (rlhf/models/internals.py), taken away: the code that
uses it stops with one line naming the transformers version, where it used to carry on silently (a patch that no
longer applies, a decode mask read as additive, a cache handed over under a name forward ignores)."""

import re
from types import SimpleNamespace

import pytest
import transformers

from rlhf.errors import ModelError
from rlhf.models import passes, sampling

ONE_LINE = rf"^transformers {re.escape(transformers.__version__)} has no [^\n]+ \(the versions it is tested with: "


def test_a_gone_packed_sequence_search_stops_the_pass(monkeypatch):
    from transformers import masking_utils

    monkeypatch.delattr(masking_utils, "find_packed_sequence_indices")
    with pytest.raises(ModelError, match=ONE_LINE + r".*") as err:
        with passes.positions_not_packed():
            pass
    assert "masking_utils.find_packed_sequence_indices" in str(err.value) and "\n" not in str(err.value)


def test_the_packed_sequence_search_is_replaced_and_restored():
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    with passes.positions_not_packed():
        assert masking_utils.find_packed_sequence_indices is not original
    assert masking_utils.find_packed_sequence_indices is original


def test_a_config_without_its_attention_implementation_stops_the_decode_mask():
    with pytest.raises(ModelError, match=ONE_LINE) as err:
        sampling.takes_boolean_mask(SimpleNamespace(layer_types=["full_attention"]))
    assert "SimpleNamespace._attn_implementation" in str(err.value)
    assert sampling.takes_boolean_mask(SimpleNamespace(_attn_implementation="sdpa"))
    assert not sampling.takes_boolean_mask(SimpleNamespace(_attn_implementation="eager"))


def test_a_forward_without_a_known_cache_argument_stops():
    class Model:
        def forward(self, input_ids, attention_mask=None, **kwargs):
            pass

    with pytest.raises(ModelError, match=ONE_LINE) as err:
        sampling.cache_kwarg(Model())
    assert "KV-cache argument in Model.forward" in str(err.value)

    class Old:
        def forward(self, input_ids, past_key_values=None):
            pass

    class New:
        def forward(self, input_ids, cache=None, past_key_values=None):
            pass

    assert sampling.cache_kwarg(Old()) == "past_key_values" and sampling.cache_kwarg(New()) == "cache"


@pytest.mark.parametrize("gone", ["DynamicLayer", "lazy_initialization"])
def test_a_gone_dynamic_layer_stops_the_preallocated_cache(monkeypatch, gone):
    from transformers import cache_utils

    if gone == "DynamicLayer":
        monkeypatch.delattr(cache_utils, "DynamicLayer")
    else:
        monkeypatch.delattr(cache_utils.DynamicLayer, "lazy_initialization")
    sampling.preallocated_layer_class.cache_clear()
    try:
        with pytest.raises(ModelError, match=ONE_LINE) as err:
            sampling.preallocated_layer_class()
        assert gone in str(err.value)
    finally:
        sampling.preallocated_layer_class.cache_clear()
