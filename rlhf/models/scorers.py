"""The reward interface: score(queries, responses, references) -> one float per response.

Two implementations chosen by `reward_model.kind`:
- `similarity` (embedded default): cosine similarity of all-MiniLM-L6-v2 sentence embeddings of the response and the
  human reference summary. It **stands in for a preference reward model** so the pipeline learns on a CPU; it rewards
  closeness to one human summary, not human preference.
- `classifier`: a sequence classifier such as Skywork-Reward-V2-Qwen3-8B, called the way its card says: the response
  text is re-rendered with the *reward model's* chat template as [user: query, assistant: response], no system
  prompt, leading BOS dropped, score = logits[..., 0] at the last real token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from rlhf.runtime.device import Device
from rlhf.runtime.distributed import Dist
from rlhf.models.sources import _from_pretrained, is_causal, load_tokenizer
from rlhf.config.params import RewardModel


class Scorer(Protocol):
    def score(self, queries: Sequence[str], responses: Sequence[str], references: Sequence[str],
              dist: Dist = Dist()) -> np.ndarray: ...


def budget_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Length-sorted micro-batches whose padded size (rows × longest) stays within token_budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _pad_right(rows: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


class SimilarityScorer:
    def __init__(self, model_dir: Path, cfg: RewardModel, device: Device):
        from transformers import AutoModel

        self.tokenizer = load_tokenizer(model_dir)
        self.model = _from_pretrained(AutoModel, model_dir, device.dtype, cfg.trust_remote_code,
                                      device.attention(cfg.attention), **device.load_kwargs).eval().to(device.where)
        self.cfg, self.device = cfg, device

    def embed(self, texts: Sequence[str], dist: Dist = Dist()) -> torch.Tensor:
        """L2-normalised, attention-masked mean of the last hidden state (sentence-transformers' recipe)."""
        rows = [self.tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in texts]
        local: dict[int, torch.Tensor] = {}
        for batch in dist.mine(budget_batches([len(r) for r in rows], self.cfg.token_budget)):
            ids, mask = _pad_right([rows[i] for i in batch], self.device.where)
            with torch.no_grad():
                h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (b, L, d)
            m = mask.unsqueeze(-1).float()  # (b, L, 1)
            pooled = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)  # (b, d)
            local.update(zip(batch, pooled.cpu()))  # merged across ranks as host tensors
        merged = dist.merge(local)
        return torch.stack([merged[i] for i in range(len(texts))])

    def score(self, queries, responses, references, dist: Dist = Dist()) -> np.ndarray:
        if any(r is None for r in references):
            raise ValueError("the similarity scorer needs a reference summary for every prompt")
        a = self.embed([r.strip() for r in responses], dist)
        b = self.embed([r.strip() for r in references], dist)
        return (a * b).sum(-1).numpy().astype(np.float32)


def render_for_reward_model(tokenizer, query: str, response: str) -> str:
    # TL;DR completions start with the space after "TL;DR:"; as a chat turn the content starts at the text.
    conversation = [{"role": "user", "content": query}, {"role": "assistant", "content": response.strip()}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        text = text[len(bos):]
    return text


class ClassifierScorer:
    def __init__(self, model_dir: Path, cfg: RewardModel, device: Device):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = load_tokenizer(model_dir)
        self.model = _from_pretrained(AutoModelForSequenceClassification, model_dir, device.dtype, cfg.trust_remote_code,
                                      device.attention(cfg.attention), num_labels=1,
                                      **device.load_kwargs).eval().to(device.where)
        self.cfg, self.device = cfg, device
        self.causal = is_causal(self.model)

    def encode(self, query: str, response: str) -> list[int]:
        text = render_for_reward_model(self.tokenizer, query, response)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[-self.cfg.max_length:] if len(ids) > self.cfg.max_length else ids

    def score(self, queries, responses, references, dist: Dist = Dist()) -> np.ndarray:
        """Budget batches are formed over all rows, then shared out: the numbers do not depend on the world size."""
        rows = [self.encode(q, r) for q, r in zip(queries, responses)]
        local: dict[int, float] = {}
        backbone = getattr(self.model, self.model.base_model_prefix)
        for batch in dist.mine(budget_batches([len(r) for r in rows], self.cfg.token_budget)):
            ids, mask = _pad_right([rows[i] for i in batch], self.device.where)
            with torch.no_grad():
                # A causal RM never lets a trailing pad reach a real token: no mask, so attention runs unpadded.
                h = backbone(input_ids=ids, attention_mask=None if self.causal else mask).last_hidden_state  # (b, L, d)
                last = mask.sum(1) - 1  # (b,) right padding: last real token, whatever the pad id is
                h_last = h[torch.arange(len(batch), device=h.device), last]  # (b, d)
                logits = self.model.score(h_last)  # (b, num_labels)
            local.update(zip(batch, logits[:, 0].float().tolist()))
        merged = dist.merge(local)
        return np.array([merged[i] for i in range(len(rows))], dtype=np.float32)


def load_scorer(model_dir: Path, cfg: RewardModel, device: Device) -> Scorer:
    """The reward model alone on `device` (the reward stage holds nothing else)."""
    cls = SimilarityScorer if cfg.kind == "similarity" else ClassifierScorer
    return cls(model_dir, cfg, device)
