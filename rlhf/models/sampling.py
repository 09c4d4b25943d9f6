"""Autoregressive sampling with a KV cache: our own loop instead of `model.generate`.

Why not `generate`: on this CPU a decode step of SmolLM2 for 8 rows is ~35 ms, and `generate` added ~13 ms of
`torch.multinomial` (it draws an exponential per vocabulary entry through a slow kernel) plus per-step bookkeeping.
Here a token is the Gumbel-max of the tempered logits (an exact sample of softmax(logits/T)), with noise from the
chunk's own seeded generator, and the cache is preallocated. The model sees what `generate` gives it: left-padded
prompts, positions counted from each row's first real token, the padding mask grown by one per step.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from rlhf.models.actors import POLICY_ADAPTER, Actors
from rlhf.models.passes import left_pad
from rlhf.runtime.distributed import Dist
from rlhf.runtime.progress import bar
from rlhf.runtime.seeding import derive_seed


def nucleus_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least the top one); the rest → −inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (b, V)
    probs = torch.softmax(sorted_logits, dim=-1)  # (b, V)
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # the mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # (b, V) back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def pick_tokens(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    """(b, V) fp32 logits → (b,) token ids: argmax, or a sample from softmax(logits / T) restricted to the nucleus."""
    if greedy:
        return logits.argmax(-1)
    scores = nucleus_filter(logits / temperature, top_p)  # (b, V)
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device)
    uniform.clamp_(min=torch.finfo(torch.float32).tiny)
    gumbel = -torch.log(-torch.log(uniform))  # (b, V): argmax(scores + Gumbel) ~ softmax(scores)
    return (scores + gumbel).argmax(-1)


def cache_kwarg(model) -> str:
    """The name model.forward takes its KV cache under: `cache` from transformers 5.24 (`past_key_values` is
    deprecated there, to be removed in 5.40), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode(model, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int],
           pad_id: int, cache, pick: Callable[[torch.Tensor], torch.Tensor],
           on_step: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """Left-padded prompts (b, P) → new tokens (b, ≤ max_new_tokens); a row that emitted a stop token gets pad_id
    after it, and the loop ends when every row has stopped."""
    b = ids.shape[0]
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=ids.device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, P): as generate() numbers left-padded rows
    mask = attention_mask
    kv = {cache_kwarg(model): cache}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kv)
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        token = pick(out.logits[:, -1].float())  # (b,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= torch.isin(token, stops)
        on_step(b)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)  # (b, P+t+1)
        positions = positions[:, -1:] + 1  # (b, 1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **kv)
    return torch.stack(new, dim=1)  # (b, n)


# --------------------------------------------------------------------------------------------- generation


def generate(
    actors: Actors, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
    seed: int, chunk_size: int, progress: str = "off", dist: Dist = Dist(), greedy: bool = False,
) -> list[list[int]]:
    """Sample responses; each is cut right after its first stop token (nothing after it is kept).

    Prompts are generated in length-sorted chunks of `chunk_size`, chunk c seeded by (seed, c): the result does not
    depend on how many processes share the chunks."""
    actors.use(POLICY_ADAPTER)
    pad = actors.tokenizer.pad_token_id
    pad = actors.stop_ids[0] if pad is None else pad
    stops = set(actors.stop_ids)
    # Length-sorted chunks: a chunk is left-padded to its longest prompt, so similar lengths waste less prefill.
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    chunks = [order[s:s + chunk_size] for s in range(0, len(order), chunk_size)]
    mine = dist.mine(list(enumerate(chunks)))
    ticks = bar(sum(len(rows) for _, rows in mine) * max_new_tokens, "generate", "tok", progress)
    model = actors.model.get_base_model()  # with the policy merged in and adapters disabled: the policy
    local: dict[int, list[int]] = {}
    for c, rows in mine:
        ids, attn = left_pad([prompts[i] for i in rows], pad, actors.device.where)
        generator = actors.device.generator(derive_seed(seed, "chunk", c))  # noise drawn on the device
        with torch.no_grad(), merged_policy(actors), actors.compute():
            cache = preallocated_cache(model.config, ids.shape[1] + max_new_tokens)
            out = decode(model, ids, attn, max_new_tokens, actors.stop_ids, pad, cache,
                         lambda logits: pick_tokens(logits, temperature, top_p, greedy, generator), ticks.update)
        for i, row in zip(rows, out.tolist()):  # the artifact boundary
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            local[i] = row[:cut]
    ticks.close()
    merged = dist.merge(local)
    return [merged[i] for i in range(len(prompts))]


def preallocated_cache(config, capacity: int):
    """A KV cache that writes each step into buffers sized for the whole generation. transformers' DynamicCache
    concatenates, copying the whole cache of every layer at every step (quadratic in length); on CPU that copy and
    its fresh allocation were ~a tenth of each decode step here. Same keys and values, same attention."""
    from transformers.cache_utils import Cache, DynamicLayer

    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return None  # sliding-window layers keep their own cache: transformers' default

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:-2], max(capacity, key_states.shape[-2]), key_states.shape[-1])
                self.buffers = (key_states.new_empty(shape), value_states.new_empty(shape))
                self.length = 0
                self.keys, self.values = (b[..., :0, :] for b in self.buffers)
            n = key_states.shape[-2]
            if self.length + n > self.buffers[0].shape[-2] or self.keys.shape[-2] != self.length:
                return super().update(key_states, value_states)  # over capacity or changed from outside: concat
            for buffer, states in zip(self.buffers, (key_states, value_states)):
                buffer[..., self.length:self.length + n, :] = states
            self.length += n
            self.keys, self.values = (b[..., :self.length, :] for b in self.buffers)
            return self.keys, self.values

    return Cache(layers=[PreallocatedLayer() for _ in range(config.num_hidden_layers)])


@contextlib.contextmanager
def merged_policy(actors: Actors):
    """The policy adapter folded into the base weights, W' = W + (α/r)·BA in the base dtype, for sampling: one GEMM
    per projection per decode step instead of three plus the adapter casts. The original weight tensors are put
    back afterwards (no subtract-back rounding), so every log-prob pass still sees the exact unmerged policy; the
    sampler's distribution differs from it only by rounding, and the recomputed log-probs are what PPO uses."""
    from peft.tuners.lora import LoraLayer

    saved = []
    try:
        with torch.no_grad():
            for module in actors.model.modules():
                if isinstance(module, LoraLayer) and POLICY_ADAPTER in module.lora_A:
                    base = module.get_base_layer()
                    delta = module.get_delta_weight(POLICY_ADAPTER)  # (out, in), scaled, adapter dtype
                    saved.append((base, base.weight.data))
                    base.weight.data = (base.weight.data.float() + delta.float()).to(base.weight.dtype)
        with actors.model.disable_adapter():
            yield
    finally:
        for base, weight in saved:
            base.weight.data = weight


def contains_stop(response: Sequence[int], stop_ids: Sequence[int]) -> bool:
    return len(response) > 0 and response[-1] in set(stop_ids)
