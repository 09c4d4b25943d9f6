"""Iteration-0 behaviour of the embedded policy under different prompt renderings: held-out-style reward (MiniLM
similarity to the human TL;DR), EOS rate, repeated word 3-grams, distinct-2 and length, greedy, 53 new tokens.

This is the measurement behind `policy_model.prompt_format` / `policy_model.instruction` (docs/results.md, "What makes the
default learn"). It uses transformers' generate and a plain MiniLM mean-pool so that it depends on nothing but a
prepared project: run it in a project where `dvc repro prepare reward_model` has run.

    python bench/prompt_formats.py --prompts 64 --formats raw,chat,instruction,instruction+cue
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from rlhf.config.presets import SUMMARY_INSTRUCTION
from rlhf.data.prompts import render_prompt
from rlhf.reports.statistics import distinct_n, mean_repeated_ngram_fraction

FORMATS = {  # name: (policy_model.prompt_format, policy_model.instruction), rendered as `prepare` renders them
    "raw": ("raw", None),
    "chat": ("chat", None),
    "instruction": ("chat", "Summarize the following Reddit post in one sentence.\n\n{post}"),
    "instruction-after": ("chat", "{post}\n\nSummarize the post above in one short sentence."),
    "instruction+cue": ("chat", SUMMARY_INSTRUCTION),
}


def embed(tokenizer, model, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state  # (b, L, d)
    m = batch["attention_mask"].unsqueeze(-1).float()  # (b, L, 1)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # (b, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="models/base/policy")
    ap.add_argument("--reward", default="models/base/reward")
    ap.add_argument("--prompts-file", default="data/prepared/eval.parquet")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32).eval()
    rtok = AutoTokenizer.from_pretrained(args.reward)
    scorer = AutoModel.from_pretrained(args.reward).eval()
    df = pd.read_parquet(args.prompts_file).head(args.prompts)
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    refs = embed(rtok, scorer, [r.strip() for r in df["reference"]])
    from rlhf.runtime.device import machine_line

    print(machine_line())
    print(f"{len(df)} prompts from {args.prompts_file}, greedy, 53 new tokens, fp32")
    print("| format | reward | EOS rate | repeated 3-grams | distinct-2 | length | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.formats.split(","):
        prompt_format, instruction = FORMATS[name]
        t0, texts, eos, lengths = time.time(), [], [], []
        for i in range(0, len(df), args.batch):
            queries = list(df["query"][i:i + args.batch])
            rendered = [render_prompt(tok, q, prompt_format, instruction) for q in queries]
            batch = tok(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = policy.generate(**batch, max_new_tokens=53, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                ends = [j for j, t in enumerate(row) if t in stops]
                eos.append(bool(ends))
                row = row[:ends[0]] if ends else row
                lengths.append(len(row))
                texts.append(tok.decode(row, skip_special_tokens=True))
        reward = (embed(rtok, scorer, [t.strip() or "." for t in texts]) * refs).sum(-1)
        print(f"| {name} | {reward.mean():.4f} | {np.mean(eos):.2f} | {mean_repeated_ngram_fraction(texts):.3f} | "
              f"{distinct_n(texts):.3f} | {np.mean(lengths):.1f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
