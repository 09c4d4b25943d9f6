"""The frozen reference's keys/values over the held-out prompts, for the evaluation's exact KL.

The evaluation measures Σ_t KL(π ‖ π_ref) along each held-out response. π's distributions are the sampler's own
(sampling.KeptLogprobs); π_ref's need a reference pass, and over prompt + response most of its tokens are the prompt
(~92% on the embedded default). The reference is frozen and the held-out prompts are fixed, so the keys/values of
each prompt are the same at every iteration: they are computed once (all prompts but their last token, in fixed
length-sorted passes, right-padded, which needs no padding mask), kept on disk under `eval.reference_cache` between
iterations, and each evaluation runs the reference over [last prompt token, response] only, on top of them.

The same computation runs whether the keys/values come from disk or were just computed (a file holds exactly what
the computation gave), so the cache never changes a result. A file is used only if its key matches: the
reference's weights, the prompts, the pass size, the numeric context and the library versions; one file is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rlhf.models.actors import Actors
from rlhf.models.internals import attn_implementation
from rlhf.models.passes import reference_lm
from rlhf.models.sampling import adopted_cache, cache_kwarg
from rlhf.ppo import kl_from_logprobs

SUFFIX = ".safetensors"


@dataclass
class PromptKV:
    """Per layer, the keys and values of every prompt but its last token, rows concatenated: prompt i's are rows
    offsets[i]:offsets[i + 1] of keys[layer] and values[layer], each (tokens, kv heads, head dim)."""

    offsets: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def batch(self, prompts: Sequence[int], extra: int, where: torch.device) -> tuple[list, torch.Tensor, int]:
        """These prompts' keys/values right-aligned in zero-filled (b, hk, P + extra, d) buffers per layer, as a
        left-padded prefill leaves them (pad slots are zeros: p·V with p = 0 stays 0), their (b, P) mask, and P."""
        lengths = [self.offsets[i + 1] - self.offsets[i] for i in prompts]
        P = max(lengths)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        buffers = []
        for keys, values in zip(self.keys, self.values):
            hk, d = keys.shape[1:]
            k_buf = torch.zeros((len(prompts), hk, P + extra, d), dtype=keys.dtype, device=where)
            v_buf = torch.zeros_like(k_buf)
            for row, (i, n) in enumerate(zip(prompts, lengths)):
                rows = slice(self.offsets[i], self.offsets[i + 1])
                k_buf[row, :, P - n:P] = keys[rows].transpose(0, 1)  # (hk, n, d)
                v_buf[row, :, P - n:P] = values[rows].transpose(0, 1)
            buffers.append((k_buf, v_buf))
        for row, n in enumerate(lengths):
            mask[row, P - n:] = 1
        return buffers, mask.to(where), P


def cache_key(actors: Actors, prompts: Sequence[Sequence[int]], rows_per_pass: int) -> str:
    """What the keys/values depend on: the reference's weights (every byte), the prompts, the pass size, the device
    type and numeric context, and the versions of the libraries that compute them."""
    import transformers

    h = hashlib.blake2b(digest_size=20)
    with reference_lm(actors) as lm:
        for name, tensor in sorted(lm.state_dict().items()):
            if "lora_" in name:  # the disabled adapters are not part of the reference
                continue
            h.update(name.encode())
            h.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
        attention = attn_implementation(lm.config)
    h.update(json.dumps([list(map(int, p)) for p in prompts]).encode())
    h.update(json.dumps([rows_per_pass, actors.device.where.type, str(actors.device.autocast_dtype), attention,
                         torch.__version__, transformers.__version__]).encode())
    return h.hexdigest()


def compute_prompt_kv(actors: Actors, prompts: Sequence[Sequence[int]], rows_per_pass: int) -> PromptKV:
    """The reference's keys/values of each prompt minus its last token, in passes of `rows_per_pass` length-sorted
    prompts, right-padded (under a causal mask the trailing pads never reach a real token: no padding mask)."""
    from transformers import DynamicCache

    lengths = [max(len(p) - 1, 0) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    per_row: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    with torch.no_grad(), reference_lm(actors) as lm:
        for s in range(0, len(order), rows_per_pass):
            rows = [i for i in order[s:s + rows_per_pass] if lengths[i] > 0]
            if not rows:
                continue
            T = max(lengths[i] for i in rows)
            ids = torch.zeros((len(rows), T), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, :lengths[i]] = torch.as_tensor(list(prompts[i][:-1]), dtype=torch.long)
            cache = DynamicCache()
            lm.get_decoder()(input_ids=ids.to(actors.device.where), use_cache=True, **{cache_kwarg(lm): cache})
            for r, i in enumerate(rows):  # (hk, n, d) → (n, hk, d): a prompt's rows are contiguous on disk
                per_row[i] = [(layer.keys[r, :, :lengths[i]].transpose(0, 1).contiguous(),
                               layer.values[r, :, :lengths[i]].transpose(0, 1).contiguous()) for layer in cache.layers]
    layers = len(next(iter(per_row.values()))) if per_row else 0
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    keys = [torch.cat([per_row[i][layer][0] for i in range(len(prompts)) if i in per_row]) for layer in range(layers)]
    values = [torch.cat([per_row[i][layer][1] for i in range(len(prompts)) if i in per_row]) for layer in range(layers)]
    return PromptKV(offsets, keys, values)


def save(kv: PromptKV, path: Path, key: str) -> None:
    """One file per folder: the others (keys/values of an earlier reference or prompt set) are removed."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"offsets": torch.tensor(kv.offsets, dtype=torch.long)}
    for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
        tensors[f"keys.{layer}"], tensors[f"values.{layer}"] = k.cpu(), v.cpu()
    # A temp name of this writer's own: two evaluations of one key at once (`rlhf init`'s baseline beside a `dvc repro
    # evaluate`) each publish a whole file, and a reader sees the old file or a whole new one, never a partial write.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"key": key})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for other in path.parent.glob(f"*{SUFFIX}"):
        if other != path:
            other.unlink(missing_ok=True)  # another writer may be removing it too


def load(path: Path, key: str, where: torch.device) -> PromptKV | None:
    """The file's keys/values if it holds `key`'s; None if it is missing, another key's, or unreadable (a cache:
    the caller recomputes and overwrites it)."""
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            layers = sum(1 for name in f.keys() if name.startswith("keys."))
            offsets = f.get_tensor("offsets").tolist()
            keys = [f.get_tensor(f"keys.{layer}").to(where) for layer in range(layers)]
            values = [f.get_tensor(f"values.{layer}").to(where) for layer in range(layers)]
    except (SafetensorError, OSError):
        return None
    return PromptKV(offsets, keys, values)


def reference_prompt_kv(actors: Actors, prompts: Sequence[Sequence[int]], rows_per_pass: int,
                        folder: str | Path | None) -> PromptKV:
    """The keys/values from `folder` if it holds this key's file, else computed (and written there if a folder is
    given). None: computed every time (on a GPU that is faster than reading them back)."""
    if folder is None:
        return compute_prompt_kv(actors, prompts, rows_per_pass)
    key = cache_key(actors, prompts, rows_per_pass)
    path = Path(folder) / f"reference-kv-{key}{SUFFIX}"
    kv = load(path, key, actors.device.where)
    if kv is None:
        kv = compute_prompt_kv(actors, prompts, rows_per_pass)
        save(kv, path, key)
    return kv


def reference_kl(kv: PromptKV, kv_rows: Sequence[int], prompts: Sequence[Sequence[int]],
                 responses: Sequence[Sequence[int]], policy_logp: torch.Tensor, actors: Actors, temperature: float,
                 rows_per_pass: int) -> list[float]:
    """Σ_t KL(π ‖ π_ref) per response: π as log-probs (b, n, V) kept while decoding, π_ref from passes of
    `rows_per_pass` rows over [last prompt token, response[:-1]] on top of the prompts' cached keys/values
    (row j's prompt is kv's prompt kv_rows[j])."""
    where = actors.device.where
    kls: list[float] = []
    with torch.no_grad(), reference_lm(actors) as lm:
        for s in range(0, len(prompts), rows_per_pass):
            rows = range(s, min(len(prompts), s + rows_per_pass))
            R = max(1, max(len(responses[j]) for j in rows))
            buffers, prompt_mask, P = kv.batch([kv_rows[j] for j in rows], R, where)
            ids = torch.zeros((len(rows), R), dtype=torch.long)
            response_mask = torch.zeros((len(rows), R))
            positions = torch.zeros((len(rows), R), dtype=torch.long)
            for r, j in enumerate(rows):
                n = len(responses[j])
                ids[r, :n] = torch.as_tensor([prompts[j][-1], *responses[j][:-1]][:n], dtype=torch.long)
                response_mask[r, :n] = 1
                positions[r] = torch.arange(R) + len(prompts[j]) - 1
            response_mask = response_mask.to(where)
            attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)  # (r, P + R)
            out = lm(input_ids=ids.to(where), attention_mask=attention_mask, position_ids=positions.to(where),
                     use_cache=True, **{cache_kwarg(lm): adopted_cache(buffers, P)})
            ref = torch.log_softmax(out.logits.float() / temperature, dim=-1)  # (r, R, V)
            kl = kl_from_logprobs(policy_logp[s:s + len(rows), :R], ref) * response_mask  # (r, R)
            kls.extend(kl.sum(-1).tolist())  # one device-to-host copy per pass, not one per row
    return kls
