"""`rlhf export`: ship a trained policy as (a) a peft adapter folder and (b) a merged model folder,
W' = W + (α/r)·B·A, that plain `AutoModelForCausalLM.from_pretrained` loads. With an SFT warm start the adapter is
the SFT adapter and the PPO adapter stacked into one (rank r_sft + r), so both folders apply to the plain base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from rlhf.artifacts.files import fresh_tmp_dir, read_state, replace_dir
from rlhf.runtime.log import log
from rlhf.models.actors import POLICY_ADAPTER, quiet_peft_wrap
from rlhf.models.sources import load_causal_lm, load_tokenizer
from rlhf.models.start import check_same_start, sft_record, stacked_adapter
from rlhf.reports import model_card
from rlhf.config.params import Params


def run(params: Params, state_dir: Path, out_dir: Path, dtype: str = "float32") -> None:
    from peft import PeftModel

    state_dir, out_dir = Path(state_dir), Path(out_dir)
    iteration = read_state(state_dir)["iteration"]
    tmp = fresh_tmp_dir(out_dir)
    if sft_record(Path(params.paths.sft)) is None:
        shutil.copytree(state_dir / POLICY_ADAPTER, tmp / "adapter")
    else:
        check_same_start(read_state(state_dir), Path(params.paths.sft), state_dir)
        stacked_adapter(Path(params.paths.sft), state_dir / POLICY_ADAPTER, tmp / "adapter")
    config_file = tmp / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    # the hub id users will load it on (the embedded base's is its hub original's)
    config["base_model_name_or_path"] = model_card.base_model(params)["hub_id"] or params.policy_model.id
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))

    base_dir = Path(params.paths.policy_model)
    base = load_causal_lm(base_dir, dtype)
    with quiet_peft_wrap():
        merged = PeftModel.from_pretrained(base, tmp / "adapter").merge_and_unload()
    merged.save_pretrained(tmp / "merged", safe_serialization=True)
    load_tokenizer(base_dir).save_pretrained(tmp / "merged")
    gen_config = base_dir / "generation_config.json"
    if gen_config.exists():
        shutil.copy2(gen_config, tmp / "merged" / "generation_config.json")
    for kind in ("adapter", "merged"):
        (tmp / kind / "README.md").write_text(model_card.render(params, state_dir, tmp / "adapter", kind))
    (tmp / "README.md").write_text(
        f"Policy after PPO iteration {iteration}, base `{params.policy_model.id}`; each folder's README.md is its "
        "model card.\n\n"
        "- `adapter/`: peft LoRA adapter (`PeftModel.from_pretrained(base, 'adapter')`).\n"
        "- `merged/`: W + (alpha/r)·B·A folded into the base weights (`AutoModelForCausalLM.from_pretrained('merged')`).\n")
    replace_dir(tmp, out_dir)
    log(f"export: iteration {iteration} → {out_dir}/adapter and {out_dir}/merged")


@torch.no_grad()
def max_logit_difference(params: Params, state_dir: Path, out_dir: Path, input_ids: torch.Tensor) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_causal_lm(Path(params.paths.policy_model), "float32")
    with quiet_peft_wrap():
        with_adapter = PeftModel.from_pretrained(base, Path(out_dir) / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(Path(out_dir) / "merged", dtype=torch.float32).eval()
    return float((with_adapter(input_ids=input_ids).logits - merged(input_ids=input_ids).logits).abs().max())
