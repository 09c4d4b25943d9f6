"""Stage `update`: PPO epochs × minibatches on the LoRA policy and the critic (rlhf/training/ppo_update.py); writes
the next iteration's state. Anything non-finite aborts before `models/next` is touched."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    import time
    from pathlib import Path

    import torch

    from rlhf import ppo
    from rlhf.artifacts.files import read_state, write_json
    from rlhf.artifacts.schema import check_token_ids
    from rlhf.models.checkpoint import OPTIMIZER_DIR, load_actors, load_optimizer, save_state
    from rlhf.runtime.device import resolve_device
    from rlhf.runtime.distributed import init_distributed
    from rlhf.runtime.log import log
    from rlhf.runtime.numerics import setting
    from rlhf.runtime.seeding import derive_seed
    from rlhf.training.ppo_update import (
        build_groups, load_batch, make_optimizer, next_kl_coef, ppo_epochs, summarise, trainable_parameters,
        write_step_curves,
    )

    device = resolve_device(params.runtime.device, params.policy_model.dtype)
    dist = init_distributed(device, params.runtime.peer_timeout)
    current = Path(params.paths.current)
    state = read_state(current)
    iteration = state["iteration"]
    params.check_schedule_horizon(iteration)
    kl_coef = params.kl_coef(state)
    df = load_batch(params)
    torch.manual_seed(derive_seed(params.seed, "update-init", iteration))
    actors = load_actors(params, current, trainable=True, device=device, with_reference=False)
    check_token_ids(df, Path(params.paths.iteration) / "rollout.parquet", actors.vocab_size)
    if params.lora.dropout > 0:
        actors.model.train()  # LoRA dropout on; the ratio ≡ 1 check then holds only in expectation
    named = trainable_parameters(actors)
    factor = ppo.lr_multiplier(iteration, params.optim.warmup_iterations, params.optim.total_iterations,
                               params.optim.schedule)
    opts = (make_optimizer(named[0], params.optim.lr * factor, params, device),
            make_optimizer(named[1], params.optim.critic_lr * factor, params, device))
    if not params.optim.reset_moments:
        load_optimizer(opts[0], named[0], current / OPTIMIZER_DIR / "policy.safetensors")
        load_optimizer(opts[1], named[1], current / OPTIMIZER_DIR / "critic.safetensors")
    groups = build_groups(df, device.where)

    start = time.perf_counter()
    history = ppo_epochs(actors, groups, params, opts, named, iteration, dist, kl_coef=kl_coef)
    if not dist.is_main:
        return  # the process exit frees the device
    write_step_curves(history, Path(params.paths.metrics) / "train")
    summary = summarise(history)
    state = {**state, "kl_coef": next_kl_coef(df, params, kl_coef)}
    summary.update({"iteration": iteration, "update_seconds": round(time.perf_counter() - start, 3),
                    "kl_coef_next": state["kl_coef"], **setting(device, params.policy_model.attention)})
    save_state(actors, opts, named, state, len(history), Path(params.paths.next))
    del actors, opts, named, groups
    device.free()
    write_json(Path(params.paths.metrics) / "update.json", summary)
    log(f"update: {len(history)} steps in {summary['update_seconds']:.1f}s, approxkl {summary['policy/approxkl']:.2e}, "
        f"first-minibatch |ratio−1| {summary['first_minibatch/ratio_max_abs_dev']:.1e}")


if __name__ == "__main__":
    run_stage(main)
