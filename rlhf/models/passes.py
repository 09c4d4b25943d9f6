"""Micro-batches and the forward passes every stage shares. Sequences are packed into fixed, length-sorted
micro-batches; log-probs are computed only on response positions, so full-vocabulary logits are never materialised
for the prompt."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rlhf.models.actors import CRITIC_ADAPTER, POLICY_ADAPTER, Actors
from rlhf.runtime.distributed import Dist

@dataclass
class Packed:
    """One micro-batch, right-padded: row i is [prompt_i, response_i, pad…]. Under a causal mask the trailing pads
    never reach a real token, so causal models run it with no padding mask (one unpadded causal attention)."""

    input_ids: torch.Tensor  # (b, L)
    response_ids: torch.Tensor  # (b, R)
    response_mask: torch.Tensor  # (b, R) float
    response_index: torch.Tensor  # (b, R): position whose hidden state predicts response token t


def pack(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
         device: torch.device | None = None) -> Packed:
    """Pad with id 0 after the sequence: the pad id is never attended to, so pad == EOS is harmless. Built row by
    row in host memory, then moved to `device` (None: torch's default) in one copy per tensor."""
    b = len(prompt_ids)
    L = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    R = max(1, max(len(r) for r in response_ids))
    input_ids = torch.zeros((b, L), dtype=torch.long)
    responses = torch.zeros((b, R), dtype=torch.long)
    response_mask = torch.zeros((b, R))
    index = torch.zeros((b, R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        row = [*p, *r]
        input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        responses[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        response_mask[i, :len(r)] = 1
        index[i] = (torch.arange(R) + len(p) - 1).clamp(max=L - 1)  # padded t: any valid index, masked later
    return Packed(*(t.to(device) for t in (input_ids, responses, response_mask, index)))


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded for sampling: (b, P) ids and attention mask, on `device` (None: torch's default)."""
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def length_sorted_groups(lengths: Sequence[int], group_size: int) -> list[int]:
    """Assign each row a micro-batch id: rows sorted by length (stable), chunked by group_size."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = [0] * len(lengths)
    for rank, i in enumerate(order):
        groups[i] = rank // group_size
    return groups


@contextlib.contextmanager
def positions_not_packed():
    """transformers looks for several sequences packed into one row whenever a forward has no mask and no cache,
    reading a flag back from the device (on a GPU a sync per forward, so per micro-batch). Our passes number every
    row 0..L-1, where that search always finds one sequence and returns None: it is answered directly."""
    from rlhf.models.internals import packed_sequence_search

    masking_utils = packed_sequence_search()
    search = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = search


def response_hidden(backbone: nn.Module, packed: Packed) -> torch.Tensor:
    # No attention mask and default positions 0..L-1: exact for every real token of a right-padded causal batch,
    # and it lets attention run unmasked-causal (see rlhf/models/attention.py).
    with positions_not_packed():
        out = backbone(input_ids=packed.input_ids, use_cache=False)
    h = out.last_hidden_state  # (b, L, d)
    idx = packed.response_index.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (b, R, d)
    # Gathered into a contiguous (b, R, d): the LM head is then one (b·R, d) GEMM (a strided input makes matmul
    # copy the (V, d) head weight once per row).
    return torch.gather(h, 1, idx)  # (b, R, d): the state that predicts token t


def response_logits(causal_lm: nn.Module, packed: Packed, temperature: float) -> torch.Tensor:
    h = response_hidden(causal_lm.get_decoder(), packed)  # (b, R, d)
    return causal_lm.get_output_embeddings()(h).float() / temperature  # (b, R, V)


def selected_logprobs(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] without the (b, R, V) log-softmax: the chosen logit minus a row-by-row logsumexp
    (one row's (R, V) temporaries at a time)."""
    chosen = torch.gather(logits, -1, index.unsqueeze(-1))  # (b, R, 1)
    lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (b, R)
    return (chosen - lse.unsqueeze(-1)).squeeze(-1)  # (b, R)


def entropy_from_logits(logits: torch.Tensor, rows_per_chunk: int = 128) -> torch.Tensor:
    """H(softmax(logits)) per position, in chunks of positions to bound the (rows, V) temporaries."""
    flat = logits.reshape(-1, logits.shape[-1])  # (b·R, V)
    parts = []
    for chunk in flat.split(rows_per_chunk, dim=0):
        logp = F.log_softmax(chunk, dim=-1)
        parts.append(-(torch.exp(logp) * logp).sum(-1))
    return torch.cat(parts).reshape(logits.shape[:-1])  # (b, R)


def token_logprobs(causal_lm: nn.Module, packed: Packed, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(a_t|s_t) and entropy of π(·|s_t) at the sampling temperature, fp32, response positions only."""
    logits = response_logits(causal_lm, packed, temperature)  # (b, R, V)
    logprobs = selected_logprobs(logits, packed.response_ids)  # (b, R)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)  # (b, R)
    return logprobs * packed.response_mask, entropy * packed.response_mask


def policy_logprobs(actors: Actors, packed: Packed, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    actors.use(POLICY_ADAPTER)
    with actors.compute():
        return token_logprobs(actors.model.get_base_model(), packed, temperature)


def policy_logprobs_entropy_grad(actors: Actors, packed: Packed, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """policy_logprobs whose entropy carries gradient (for an entropy bonus); it keeps the (b·R, V) log-softmax
    for the backward pass, which policy_logprobs avoids."""
    actors.use(POLICY_ADAPTER)
    with actors.compute():
        logits = response_logits(actors.model.get_base_model(), packed, temperature)  # (b, R, V)
        logprobs = selected_logprobs(logits, packed.response_ids)  # (b, R)
        entropy = entropy_from_logits(logits)  # (b, R)
    return logprobs * packed.response_mask, entropy * packed.response_mask


def exact_kl(actors: Actors, packed: Packed, temperature: float) -> torch.Tensor:
    """KL(π(·|s_t) ‖ π_ref(·|s_t)) over the whole vocabulary at every response position, (b, R)."""
    from rlhf.ppo import kl_full

    actors.use(POLICY_ADAPTER)
    with actors.compute():
        logits = response_logits(actors.model.get_base_model(), packed, temperature)  # (b, R, V)
    return kl_full(logits, reference_response_logits(actors, packed, temperature)) * packed.response_mask


@contextlib.contextmanager
def reference_lm(actors: Actors):
    """The reference causal LM, inside the numeric context of every pass: a separate model when
    policy_model.reference names one, else the shared base with the adapters disabled."""
    if not actors.reference_loaded:
        raise RuntimeError("these actors were loaded without the reference (load_actors(with_reference=False))")
    with actors.compute():
        if actors.reference is not None:
            yield actors.reference
        else:
            with actors.model.disable_adapter():
                yield actors.model.get_base_model()


def reference_response_logits(actors: Actors, packed: Packed, temperature: float) -> torch.Tensor:
    """The reference's tempered fp32 logits at the response positions, (b, R, V)."""
    with reference_lm(actors) as lm:
        return response_logits(lm, packed, temperature)


def reference_logprobs(actors: Actors, packed: Packed, temperature: float) -> torch.Tensor:
    with reference_lm(actors) as lm:
        return token_logprobs(lm, packed, temperature)[0]


def critic_values(actors: Actors, packed: Packed) -> torch.Tensor:
    with actors.compute():
        if actors.critic_backbone is not None:
            h = response_hidden(actors.critic_backbone, packed)
        else:
            actors.use(CRITIC_ADAPTER)
            h = response_hidden(actors.model.get_base_model().get_decoder(), packed)
            actors.use(POLICY_ADAPTER)
    return actors.value_head(h.float()).squeeze(-1) * packed.response_mask  # (b, R): the head stays fp32


# --------------------------------------------------------------------------------------------- per-row passes


def per_token_columns(actors: Actors, df, passes, dist: Dist = Dist()) -> list[list]:
    """Run `passes(packed) -> tuple of (b, R) tensors` over a rollout frame's micro-batches (shared out across ranks)
    and return, per tensor, one unpadded list per row in the frame's order."""
    local = {}
    for _, group in dist.mine(list(df.groupby("micro_batch", sort=True))):
        packed = pack(list(group["prompt_ids"]), list(group["response_ids"]), actors.device.where)
        with torch.no_grad():
            outs = [t.cpu() for t in passes(packed)]  # the artifact boundary: one copy per micro-batch
        for j, i in enumerate(group.index):
            n = len(df.at[i, "response_ids"])
            local[i] = tuple(t[j, :n].tolist() for t in outs)
    merged = dist.merge(local)
    return [[merged[i][k] for i in range(len(df))] for k in range(len(next(iter(merged.values()), ())))]


def score_responses(actors: Actors, df, temperature: float, dist: Dist = Dist()) -> tuple[list, list]:
    """Per-token log-probs and entropies of a rollout frame's responses."""
    logprobs, entropy = per_token_columns(actors, df, lambda packed: policy_logprobs(actors, packed, temperature), dist)
    return logprobs, entropy


def score_references(actors: Actors, rollout, temperature: float, dist: Dist = Dist()) -> tuple[list, list]:
    """Reference log-probs and critic values (V_old) per response token of a rollout frame."""
    def passes(packed):
        return reference_logprobs(actors, packed, temperature), critic_values(actors, packed)  # (b, R) each

    ref_logprobs, values = per_token_columns(actors, rollout, passes, dist)
    return ref_logprobs, values
