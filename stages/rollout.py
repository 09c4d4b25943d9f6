"""Stage `rollout`: the current policy (base + this iteration's LoRA adapter) samples one response per prompt.

Log-probs are recomputed after sampling by a plain forward pass at the sampling temperature, in the same fixed,
length-sorted micro-batches and precision the update stage uses — so the first PPO minibatch sees ratio ≡ 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    import time
    from pathlib import Path

    import pandas as pd

    from rlhf.artifacts.files import read_state, write_json
    from rlhf.artifacts.schema import check_token_ids, read_artifact, write_artifact
    from rlhf.models.checkpoint import load_actors
    from rlhf.models.passes import length_sorted_groups, score_responses
    from rlhf.models.sampling import contains_stop, generate
    from rlhf.runtime.device import resolve_device
    from rlhf.runtime.distributed import init_distributed
    from rlhf.runtime.log import log
    from rlhf.runtime.numerics import setting
    from rlhf.runtime.seeding import derive_seed

    device = resolve_device(params.runtime.device, params.policy_model.dtype)
    dist = init_distributed(device, params.runtime.peer_timeout)
    state = read_state(params.paths.current)
    batch_path = Path(params.paths.iteration) / "batch.parquet"
    batch = read_artifact(batch_path, "prompts")
    actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False, device=device,
                         with_reference=False)
    check_token_ids(batch, batch_path, actors.vocab_size)

    cfg = params.rollout
    start = time.perf_counter()
    responses = generate(actors, list(batch["prompt_ids"]), cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                         seed=derive_seed(params.seed, "rollout", state["iteration"]), chunk_size=cfg.generation_chunk,
                         progress=params.runtime.progress, dist=dist, rows_per_pass=cfg.micro_batch_size)
    gen_seconds = time.perf_counter() - start
    lengths = [len(p) + len(r) for p, r in zip(batch["prompt_ids"], responses)]
    df = pd.DataFrame({
        "prompt_id": batch["prompt_id"],
        "micro_batch": length_sorted_groups(lengths, cfg.micro_batch_size),
        "query": batch["query"],
        "reference": batch["reference"],
        "prompt_ids": batch["prompt_ids"],
        "response_ids": responses,
        "response_text": actors.tokenizer.batch_decode(responses, skip_special_tokens=True),
        "response_length": [len(r) for r in responses],
        "contains_eos": [contains_stop(r, actors.stop_ids) for r in responses],
    })
    df["logprobs"], df["entropy"] = score_responses(actors, df, cfg.temperature, dist)
    del actors
    device.free()
    if not dist.is_main:
        return

    write_artifact(df, "rollout", Path(params.paths.iteration) / "rollout.parquet")
    new_tokens = int(df["response_length"].sum())
    metrics = {
        "iteration": state["iteration"],
        "generate_seconds": round(gen_seconds, 3),
        "generated_tokens_per_s": round(new_tokens / max(gen_seconds, 1e-9), 2),
        "response_length_mean": float(df["response_length"].mean()),
        "eos_rate": float(df["contains_eos"].mean()),
        "compute_dtype": device.dtype,  # policy_model.dtype with `auto` resolved on this machine
        **setting(device, params.policy_model.attention),  # what the update's first forward must match
    }
    write_json(Path(params.paths.metrics) / "rollout.json", metrics)
    log(f"rollout: {len(df)} responses, {new_tokens} tokens in {gen_seconds:.1f}s "
        f"({metrics['generated_tokens_per_s']:.1f} tok/s), EOS rate {metrics['eos_rate']:.2f}")


if __name__ == "__main__":
    run_stage(main)
