"""Autoregressive sampling with a KV cache: our own loop instead of `model.generate`.

Why not `generate`: on this CPU a decode step of SmolLM2 for 8 rows is ~35 ms, and `generate` added ~13 ms of
`torch.multinomial` (it draws an exponential per vocabulary entry through a slow kernel) plus per-step bookkeeping.
Here a token is the Gumbel-max of the tempered logits (an exact sample of softmax(logits/T)), with noise from the
chunk's own seeded generator, and the cache is preallocated. The model sees what `generate` gives it: left-padded
prompts, positions counted from each row's first real token, the padding mask grown by one per step.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from rlhf.models.actors import POLICY_ADAPTER, Actors
from rlhf.models.passes import left_pad
from rlhf.runtime.distributed import Dist
from rlhf.runtime.progress import bar
from rlhf.runtime.seeding import derive_seed

# (rows of the prompts, their responses, π's kept log-probs (b, n, V)) → Σ_t KL(π ‖ π_ref) per row
ReferenceKL = Callable[[list, list, torch.Tensor], list]


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
    """The name model.forward takes its KV cache under (internals.cache_argument)."""
    from rlhf.models.internals import cache_argument

    return cache_argument(model)


class CachedLM:
    """A causal LM that reads a chunk of left-padded prompts once and then one new token per row per step, from its
    own KV cache."""

    def __init__(self, model, capacity: int):
        self.model, self.capacity, self.kwarg = model, capacity, cache_kwarg(model)
        self.cache = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                rows_per_pass: int) -> torch.Tensor:
        """Logits of the first new token, (b, V). Expects rows sorted by length: each pass of `rows_per_pass` rows
        drops the columns that are padding in all of its rows (a quarter of the tokens of a 32-prompt TL;DR chunk
        padded to its longest prompt are padding), and its keys/values are copied right-aligned into the chunk's
        cache, where the decode steps see exactly the left-padded layout (pad slots hold zeros and are masked).
        At most one pass's cache exists besides the chunk's."""
        b, P = ids.shape
        if rows_per_pass >= b or not full_attention_only(self.model.config):
            self.cache = preallocated_cache(self.model.config, self.capacity)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self.kwarg: self.cache})
            if self.cache is None:  # sliding windows: transformers' own cache (`cache` from 5.24 on)
                self.cache = getattr(out, "cache", None) or out.past_key_values
            return out.logits[:, -1]
        logits, buffers = [], []
        real = mask.sum(-1)  # (b,)
        for s in range(0, b, rows_per_pass):
            rows = slice(s, min(b, s + rows_per_pass))
            start = P - int(real[rows].max())
            part = preallocated_cache(self.model.config, P - start)
            out = self.model(input_ids=ids[rows, start:], attention_mask=mask[rows, start:],
                             position_ids=positions[rows, start:], use_cache=True, logits_to_keep=1,
                             **{self.kwarg: part})
            logits.append(out.logits[:, -1])
            for i, layer in enumerate(part.layers):
                if len(buffers) <= i:  # (b, hk, capacity, d), zeros: a finite fill, since p·V with p = 0 must stay 0
                    shape = (b, layer.keys.shape[1], max(self.capacity, P), layer.keys.shape[3])
                    buffers.append((layer.keys.new_zeros(shape), layer.values.new_zeros(shape)))
                buffers[i][0][rows, :, start:P] = layer.keys
                buffers[i][1][rows, :, start:P] = layer.values
        self.cache = adopted_cache(buffers, P)
        return torch.cat(logits)

    def step(self, token: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(b,) new tokens → logits of the next one, (b, V)."""
        if full_attention_only(self.model.config) and takes_boolean_mask(self.model.config):
            # The one query row of each sequence sees every key that is not padding: (b, 1, 1, S), the mask
            # transformers builds, given ready-made, since building it reads "is anything padded" back from the
            # device first (on a GPU, a sync per token). Only for implementations whose mask is boolean: eager
            # adds its mask to the scores, so a boolean one there would leave the padding visible.
            mask = mask[:, None, None, :].bool()
        out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.kwarg: self.cache})
        return out.logits[:, -1]


# Decode steps between host reads of "has every row stopped": one sync per token would keep a GPU's queue empty.
END_CHECK_EVERY = 8


def takes_boolean_mask(config) -> bool:
    from rlhf.models.attention import NAME as CHUNKED
    from rlhf.models.internals import attn_implementation

    return attn_implementation(config) in ("sdpa", CHUNKED)


def full_attention_only(config) -> bool:
    """No sliding-window layers: the model's cache can be ours (sliding windows keep transformers' own)."""
    return all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])


def decode(lm: CachedLM, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           stop_ids: Sequence[int], pad_id: int, pick: Callable[[torch.Tensor], torch.Tensor], rows_per_pass: int,
           on_step: Callable[[int], None] = lambda n: None,
           observe: Callable[[torch.Tensor], None] = lambda logits: None,
           check_every: int = END_CHECK_EVERY) -> torch.Tensor:
    """Left-padded prompts (b, P) → new tokens (b, ≤ max_new_tokens) sampled by `pick`; `observe` sees the logits
    of every position before its token is picked. A row that emitted a stop token gets pad_id after it, and the
    loop ends when every row has stopped: the tokens returned end at the step where the last row stopped, whatever
    `check_every` is. Whether all rows stopped is read on the host every `check_every` steps only (reading it is a
    device sync, which on a GPU stalls the host until every queued step has run); so up to check_every - 1 steps
    past the end run, are observed and dropped (their noise comes from the chunk's own generator). An observer with
    a `keep(n)` method is told how many of the steps it saw were returned, so it drops the others itself."""
    b = ids.shape[0]
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=ids.device)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (b, P): as generate() numbers left-padded rows
    mask = attention_mask
    logits = lm.prefill(ids, mask, positions, rows_per_pass)  # (b, V)
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    new: list[torch.Tensor] = []
    ended: list[torch.Tensor] = []  # per step since the last check, on the device: every row had stopped
    for step in range(max_new_tokens):
        observe(logits)
        token = pick(logits.float())  # (b,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done |= torch.isin(token, stops)
        ended.append(done.all())
        on_step(b)
        last = step == max_new_tokens - 1
        if len(ended) == check_every or last:
            past = int(torch.stack(ended).sum())  # stopped rows stay stopped: the steps run since the end
            ended = []
            if past or last:
                del new[len(new) + 1 - past:]  # those steps' tokens are pad_id in every row
                break
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)  # (b, P+t+1)
        positions = positions[:, -1:] + 1  # (b, 1)
        logits = lm.step(token, mask, positions)
    keep = getattr(observe, "keep", None)
    if keep is not None:
        keep(len(new))
    return torch.stack(new, dim=1)  # (b, n)


# --------------------------------------------------------------------------------------------- generation


def generate(
    actors: Actors, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
    seed: int, chunk_size: int, progress: str = "off", dist: Dist = Dist(), greedy: bool = False,
    rows_per_pass: int | None = None,
) -> list[list[int]]:
    """Sample responses; each is cut right after its first stop token (nothing after it is kept).

    Prompts are generated in length-sorted chunks of `chunk_size`, chunk c seeded by (seed, c): the result does not
    depend on how many processes share the chunks. rows_per_pass: rows per prefill forward (None: the chunk)."""
    responses, _ = _generate(actors, prompts, max_new_tokens, temperature, top_p, seed, chunk_size, progress, dist,
                             greedy, rows_per_pass, kl_temperature=None)
    return responses


def generate_with_reference_kl(
    actors: Actors, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
    seed: int, chunk_size: int, kl_temperature: float, reference_kl: ReferenceKL, progress: str = "off",
    greedy: bool = False, rows_per_pass: int | None = None,
) -> tuple[list[list[int]], list[float]]:
    """generate(), and along each response Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)) at `kl_temperature`, exact over the
    vocabulary. π's distributions are the sampler's own logits, kept while decoding (chunk × new tokens × vocabulary
    fp32 values; with a bf16 base the sampler then runs the unmerged adapter); after each chunk
    `reference_kl(rows, responses, kept)` sums the KL against π_ref for those rows of `prompts` (the evaluation's
    runs the reference over the responses only, on its cached prompt keys/values: rlhf/models/reference_cache.py).
    No second policy pass over prompt + response."""
    return _generate(actors, prompts, max_new_tokens, temperature, top_p, seed, chunk_size, progress, Dist(), greedy,
                     rows_per_pass, kl_temperature=kl_temperature, reference_kl=reference_kl)


def _generate(actors: Actors, prompts, max_new_tokens: int, temperature: float, top_p: float, seed: int,
              chunk_size: int, progress: str, dist: Dist, greedy: bool, rows_per_pass: int | None,
              kl_temperature: float | None, reference_kl: ReferenceKL | None = None,
              ) -> tuple[list[list[int]], list[float] | None]:
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
    # A bf16 merge rounds away every element of (α/r)·BA below half a bf16 step of W (most of them early in training):
    # fine for drawing samples, not for a KL that should measure the trained adapter. With a bf16 base the KL's
    # policy therefore decodes through the unmerged adapter.
    merge = kl_temperature is None or actors.device.autocast_dtype is None
    local: dict[int, tuple[list[int], float | None]] = {}
    for c, rows in mine:
        ids, attn = left_pad([prompts[i] for i in rows], pad, actors.device.where)
        generator = actors.device.generator(derive_seed(seed, "chunk", c))  # noise drawn on the device
        per_pass = rows_per_pass or len(rows)
        kept = KeptLogprobs(max_new_tokens, kl_temperature) if kl_temperature is not None else None
        with (torch.no_grad(), merged_policy(actors) if merge else contextlib.nullcontext(), actors.compute(),
              weight_major_linears(model, actors.device.weight_major_decode)):
            out = decode(CachedLM(model, ids.shape[1] + max_new_tokens), ids, attn, max_new_tokens, actors.stop_ids,
                         pad, lambda logits: pick_tokens(logits, temperature, top_p, greedy, generator), per_pass,
                         ticks.update, kept or (lambda logits: None))
        responses = []
        for row in out.tolist():  # the artifact boundary
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            responses.append(row[:cut])
        kls = reference_kl(rows, responses, kept.logprobs) if kept else [None] * len(rows)
        local.update({i: (r, kl) for i, r, kl in zip(rows, responses, kls)})
    ticks.close()
    merged = dist.merge(local)
    responses = [merged[i][0] for i in range(len(prompts))]
    return responses, ([merged[i][1] for i in range(len(prompts))] if kl_temperature is not None else None)


class KeptLogprobs:
    """A decode observer: log softmax(logits / T) of every decoded position, in one (b, steps, V) fp32 buffer."""

    def __init__(self, steps: int, temperature: float):
        self.steps, self.temperature = steps, temperature
        self.buffer: torch.Tensor | None = None
        self.n = 0

    def __call__(self, logits: torch.Tensor) -> None:  # (b, V)
        if self.buffer is None:
            self.buffer = logits.new_empty((logits.shape[0], self.steps, logits.shape[-1]), dtype=torch.float32)
        self.buffer[:, self.n] = torch.log_softmax(logits.float() / self.temperature, dim=-1)
        self.n += 1

    def keep(self, n: int) -> None:
        """decode ran past the end: only its first n steps are the responses'."""
        self.n = n

    @property
    def logprobs(self) -> torch.Tensor:
        return self.buffer[:, :self.n]  # (b, n, V)


def preallocated_cache(config, capacity: int):
    """A KV cache that writes each step into buffers sized for the whole generation. transformers' DynamicCache
    concatenates, copying the whole cache of every layer at every step (quadratic in length); on CPU that copy and
    its fresh allocation were ~a tenth of each decode step here. Same keys and values, same attention.
    None for models with sliding-window layers (they keep transformers' own cache)."""
    from transformers.cache_utils import Cache

    if not full_attention_only(config):
        return None
    layer = preallocated_layer_class()
    return Cache(layers=[layer(capacity) for _ in range(config.num_hidden_layers)])


def adopted_cache(buffers: list, length: int):
    """A cache over given per-layer (keys, values) buffers (b, hk, capacity, d) whose first `length` slots are
    filled."""
    from transformers.cache_utils import Cache

    layer = preallocated_layer_class()
    return Cache(layers=[layer.adopt(keys, values, length) for keys, values in buffers])


@functools.cache
def preallocated_layer_class():
    """Built on first use (transformers is imported lazily), then the same class for every cache."""
    from rlhf.models.internals import dynamic_layer

    class PreallocatedLayer(dynamic_layer()):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity

        @classmethod
        def adopt(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> "PreallocatedLayer":
            """A layer over given (b, hk, capacity, d) buffers whose first `length` slots are filled."""
            layer = cls(keys.shape[-2])
            layer.lazy_initialization(keys, values)
            layer.buffers, layer.length = (keys, values), length
            layer.keys, layer.values = (buf[..., :length, :] for buf in layer.buffers)
            return layer

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:-2], max(self.capacity, key_states.shape[-2]), key_states.shape[-1])
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

    return PreallocatedLayer


# Rows up to which a projection runs as W·xᵀ: decode steps (one row per sequence of a chunk); prefill and scoring
# passes have hundreds of rows, where x·Wᵀ is the faster layout.
WEIGHT_MAJOR_MAX_ROWS = 128


def weight_major_forward(module, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear's y = x·Wᵀ + b computed as (W·xᵀ)ᵀ for few rows: the weight is the GEMM's row-major left operand,
    the layout oneDNN's fp32 kernels stream fastest when x is thin. Same products, another summation order
    (rounding only); the result is a transposed view, which the decoder's reshapes accept."""
    rows = x.numel() // x.shape[-1]
    if rows > WEIGHT_MAJOR_MAX_ROWS or (rows < 16 and module.out_features < 8 * module.in_features):
        return F.linear(x, module.weight, module.bias)  # below 16 rows only the LM head's shape gains
    y = torch.mm(module.weight, x.reshape(rows, x.shape[-1]).t())  # (out, rows)
    if module.bias is not None:
        y = y + module.bias[:, None]
    return y.t().reshape(*x.shape[:-1], module.out_features)  # (..., out)


@contextlib.contextmanager
def weight_major_linears(model, enabled: bool):
    """Every nn.Linear of `model` runs weight_major_forward while inside (per instance; the class is untouched)."""
    import types

    patched = [m for m in model.modules() if type(m) is torch.nn.Linear] if enabled else []
    try:
        for module in patched:
            module.forward = types.MethodType(weight_major_forward, module)
        yield
    finally:
        for module in patched:
            del module.forward


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
