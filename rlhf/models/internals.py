"""The transformers internals this package patches or leans on, each reached through here: on a transformers version
where one is gone, the stage stops with one line naming that version, instead of a patch that silently does nothing
or a decode mask read the wrong way."""

from __future__ import annotations

from rlhf.errors import ModelError


def missing(what: str) -> ModelError:
    import transformers

    return ModelError(f"transformers {transformers.__version__} has no {what}, which rlhf relies on "
                      "(the versions it is tested with: 5.17.0 and 5.25)")


def attn_implementation(config) -> str | None:
    """The attention implementation a loaded model's config names (None when the model has not resolved one)."""
    if not hasattr(config, "_attn_implementation"):
        raise missing(f"{type(config).__name__}._attn_implementation")
    return config._attn_implementation


def cache_argument(model) -> str:
    """The name model.forward takes its KV cache under: `cache` from transformers 5.24 (`past_key_values` is
    deprecated there, to be removed in 5.40), `past_key_values` before."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise missing(f"KV-cache argument in {type(model).__name__}.forward (neither `cache` nor `past_key_values`)")


def dynamic_layer():
    """transformers' DynamicLayer, which sampling.PreallocatedLayer extends through its lazy_initialization."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        raise missing("cache_utils.DynamicLayer") from None
    method = getattr(DynamicLayer, "lazy_initialization", None)
    if method is None or getattr(method, "__isabstractmethod__", False):  # only the abstract base's left
        raise missing("cache_utils.DynamicLayer.lazy_initialization")
    return DynamicLayer


def packed_sequence_search():
    """transformers.masking_utils with its find_packed_sequence_indices (passes.positions_not_packed replaces it)."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        raise missing("masking_utils.find_packed_sequence_indices")
    return masking_utils
