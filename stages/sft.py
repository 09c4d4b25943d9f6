"""Stage `sft`: the optional warm start before PPO (rlhf/training/sft.py). A LoRA adapter fine-tuned on the human
TL;DRs of the training prompts is written to paths.sft with its sft.json; every later model stage merges it into the
shared base (rlhf/models/start.py), so the reference is the SFT policy. With sft.enabled false it writes only
sft.json and PPO starts from the base. The held-out summaries' NLL before and after goes to metrics/sft.json."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this workspace's rlhf, not an installed one

from rlhf.runtime.stage import run_stage  # noqa: E402


def main(params) -> None:
    import time
    from pathlib import Path

    import torch

    from rlhf.artifacts.files import fresh_tmp_dir, replace_dir, write_json
    from rlhf.artifacts.schema import check_token_ids, read_artifact
    from rlhf.errors import ModelError
    from rlhf.models.checkpoint import check_target_modules, save_adapters
    from rlhf.models.sources import load_causal_lm, load_tokenizer
    from rlhf.models.start import SFT_FILE, adapter_digest
    from rlhf.runtime.device import resolve_device
    from rlhf.runtime.log import log
    from rlhf.runtime.seeding import derive_seed
    from rlhf.training.sft import build_examples, mean_nll, train, with_lora, write_loss_curve

    cfg, out, metrics = params.sft, Path(params.paths.sft), Path(params.paths.metrics)
    if not cfg.enabled:
        tmp = fresh_tmp_dir(out)
        write_json(tmp / SFT_FILE, {"enabled": False})
        replace_dir(tmp, out)
        write_json(metrics / "sft.json", {"enabled": False})
        write_loss_curve([], metrics / "sft_loss.tsv")
        log("sft: off (sft.enabled: false); PPO starts from the base model")
        return

    pm, lora = params.policy_model, params.lora
    device = resolve_device(params.runtime.device, pm.dtype)
    base_dir, prepared = Path(params.paths.policy_model), Path(params.paths.prepared)
    tokenizer = load_tokenizer(base_dir)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"sft: the tokenizer in {base_dir} has no EOS token to end the summaries with")
    max_tokens = params.rollout.max_new_tokens
    train_prompts, held_out_prompts = (read_artifact(prepared / f"{split}.parquet", "prompts")
                                       for split in ("train", "eval"))
    examples, skipped = build_examples(train_prompts, tokenizer, tokenizer.eos_token_id, max_tokens, cfg.examples,
                                       derive_seed(params.seed, "sft-examples"))
    held_out, held_out_skipped = build_examples(held_out_prompts, tokenizer, tokenizer.eos_token_id, max_tokens,
                                                None, 0)
    if not examples:
        raise ModelError(f"sft: no training summary fits rollout.max_new_tokens = {max_tokens} tokens")

    torch.manual_seed(derive_seed(params.seed, "sft-init"))
    base = load_causal_lm(base_dir, device.dtype, pm.trust_remote_code, device.attention(pm.attention))
    check_target_modules(base, lora.target_modules)
    for frame, split in ((train_prompts, "train"), (held_out_prompts, "eval")):
        check_token_ids(frame, prepared / f"{split}.parquet", base.get_input_embeddings().num_embeddings)
    model = with_lora(base, lora, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lm = model.get_base_model()

    start = time.perf_counter()
    before = mean_nll(lm, held_out, device, cfg.micro_batch_size) if held_out else None
    history = train(lm, trainable, examples, cfg, device, params.seed, params.runtime.progress)
    after = mean_nll(lm, held_out, device, cfg.micro_batch_size) if held_out else None

    tmp = fresh_tmp_dir(out)
    save_adapters(model, tmp)
    record = {"enabled": True, "adapter_sha256": adapter_digest(tmp), "examples": len(examples),
              "steps": len(history), "base": str(base_dir),
              "prompt_ids": sorted(e.prompt_id for e in examples)}  # which posts' summaries it learnt from
    write_json(tmp / SFT_FILE, record)
    replace_dir(tmp, out)
    write_loss_curve(history, metrics / "sft_loss.tsv")
    write_json(metrics / "sft.json", {
        "enabled": True, "examples": len(examples), "skipped_long_summaries": skipped, "steps": len(history),
        "target_tokens": sum(len(e.target_ids) for e in examples),
        "train_loss_first_step": history[0]["loss"], "train_loss_last_step": history[-1]["loss"],
        "heldout_prompts": len(held_out), "heldout_skipped_long_summaries": held_out_skipped,
        "heldout_nll_before": before, "heldout_nll_after": after, "seconds": round(time.perf_counter() - start, 3),
    })
    log(f"sft: {len(examples)} summaries, {len(history)} steps; held-out NLL per summary token "
        f"{before:.4f} → {after:.4f}" if held_out else f"sft: {len(examples)} summaries, {len(history)} steps")


if __name__ == "__main__":
    run_stage(main)
