"""An iteration's state folder: the LoRA adapters (peft layout), the value head, the full critic backbone if any,
the AdamW moments and state.json. Iteration 0 is made here from the seed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rlhf.artifacts.files import STATE_FILE, fresh_tmp_dir, read_state, replace_dir, write_json
from rlhf.config.params import Params
from rlhf.errors import ModelError
from rlhf.models.actors import CRITIC_ADAPTER, POLICY_ADAPTER, Actors, hidden_size, lora_config, quiet_peft_wrap
from rlhf.models.sources import _from_pretrained, load_causal_lm, load_tokenizer, stop_token_ids
from rlhf.models.start import check_same_start, load_policy_start, sft_fingerprint
from rlhf.runtime.device import Device, resolve_device

OPTIMIZER_DIR = "optimizer"


def check_target_modules(model: nn.Module, targets) -> None:
    """lora.target_modules against the architecture, before peft wraps it (peft's own complaint is a traceback).
    A target matches as in peft: a module's full name or its last dotted parts."""
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linear = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear))
        raise ModelError(f"lora.target_modules: {', '.join(missing)} not in the model; its linear modules: "
                         f"{', '.join(linear)}")


def init_state(params: Params, out_dir: Path) -> None:
    """Iteration 0: a fresh policy adapter (B = 0, so it equals the base), a critic, a seeded value head and
    state.json (which records the SFT adapter the adapters start on, if any)."""
    from peft import get_peft_model

    torch.manual_seed(params.seed)
    base_dir = Path(params.paths.policy_model)
    base = load_causal_lm(base_dir, "float32", params.policy_model.trust_remote_code)
    lora = params.lora
    check_target_modules(base, lora.target_modules)
    with quiet_peft_wrap():
        model = get_peft_model(base, lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules),
                               adapter_name=POLICY_ADAPTER)
    if params.critic.mode == "lora":
        c = params.critic
        model.add_adapter(CRITIC_ADAPTER, lora_config(c.lora_r, c.lora_alpha, 0.0, lora.target_modules))
    save_adapters(model, out_dir)  # peft writes non-default adapters to out_dir/<adapter name>/
    d = hidden_size(base)
    head = nn.Linear(d, 1)
    nn.init.normal_(head.weight, std=params.critic.head_init_std)
    nn.init.zeros_(head.bias)
    save_value_head(head, out_dir / CRITIC_ADAPTER)
    if params.critic.mode == "full":  # the critic's backbone is the policy's start (the SFT model with sft on)
        full = load_policy_start(base_dir, Path(params.paths.sft), "float32", params.policy_model.trust_remote_code)
        full.get_decoder().save_pretrained(out_dir / CRITIC_ADAPTER / "backbone", safe_serialization=True)
    write_json(out_dir / STATE_FILE, {"iteration": 0, "global_step": 0, "seed": params.seed, "kl_coef": params.kl.coef,
                                      "sft": sft_fingerprint(Path(params.paths.sft))})  # the start its adapters sit on


def save_adapters(model: nn.Module, folder: Path, adapters: list[str] | None = None) -> None:
    """peft's save_pretrained, with adapter_config.json made byte-stable (peft writes target_modules from a set,
    in hash order), so identical training gives identical files and DVC sees no change."""
    model.save_pretrained(folder, selected_adapters=adapters)
    for config_file in [*Path(folder).glob("adapter_config.json"), *Path(folder).glob("*/adapter_config.json")]:
        config = json.loads(config_file.read_text())
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))


def save_value_head(head: nn.Linear, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().contiguous(), "bias": head.bias.detach().float().contiguous()},
              str(folder / "value_head.safetensors"))


def load_value_head(folder: Path, d: int) -> nn.Linear:
    from safetensors.torch import load_file

    head = nn.Linear(d, 1)
    head.load_state_dict(load_file(str(folder / "value_head.safetensors")))
    return head


def load_actors(params: Params, state_dir: Path, trainable: bool, with_critic: bool = True,
                device: Device | None = None, with_reference: bool = True) -> Actors:
    """The iteration's models on `device` (None: the one params.runtime.device resolves to). with_reference=False
    skips loading a separate policy_model.reference (and reading that key) for stages that never run it."""
    from peft import PeftModel

    pm = params.policy_model
    device = device or resolve_device(params.runtime.device, pm.dtype)
    attention = device.attention(pm.attention)
    base_dir, sft_dir = Path(params.paths.policy_model), Path(params.paths.sft)
    check_same_start(read_state(state_dir), sft_dir, state_dir)
    tokenizer = load_tokenizer(base_dir)
    base = load_policy_start(base_dir, sft_dir, device.dtype, pm.trust_remote_code, attention, **device.load_kwargs)
    check_target_modules(base, params.lora.target_modules)
    # Not low_cpu_mem_usage: that builds the adapters empty in the base dtype and fills them from the files, so with
    # a bf16 base the fp32 master weights came back rounded to bf16 at every iteration boundary. Built in fp32
    # (autocast_adapter_dtype) and then filled, they load bit for bit (a random init is overwritten: ~0.1 s).
    with quiet_peft_wrap():
        model = PeftModel.from_pretrained(base, state_dir / POLICY_ADAPTER, adapter_name=POLICY_ADAPTER,
                                          is_trainable=trainable, autocast_adapter_dtype=True, low_cpu_mem_usage=False)
    critic_backbone = None
    if with_critic and params.critic.mode == "lora":
        model.load_adapter(state_dir / CRITIC_ADAPTER, adapter_name=CRITIC_ADAPTER, is_trainable=trainable,
                           low_cpu_mem_usage=False)
    elif with_critic:
        from transformers import AutoModel

        # fp32 master weights, as the LoRA adapters have: with a bf16 base the passes run under autocast (bf16
        # matmuls) while AdamW updates fp32 weights; a bf16 copy would lose most updates to rounding.
        critic_backbone = _from_pretrained(AutoModel, state_dir / CRITIC_ADAPTER / "backbone", "float32", False,
                                           attention, **device.load_kwargs)
        critic_backbone.train(False).requires_grad_(trainable).to(device.where)
    head = load_value_head(state_dir / CRITIC_ADAPTER, hidden_size(base)).requires_grad_(trainable).to(device.where)
    reference = None
    if with_reference and pm.reference:
        reference = load_causal_lm(Path(pm.reference), device.dtype, pm.trust_remote_code, attention,
                                   **device.load_kwargs).to(device.where)
    model.to(device.where)
    model.eval()  # dropout is off; train() only matters if lora.dropout > 0
    actors = Actors(model, tokenizer, head, critic_backbone, reference, stop_token_ids(tokenizer, base_dir), trainable,
                    device, reference_loaded=with_reference)
    actors.use(POLICY_ADAPTER)
    return actors


def save_optimizer(opt: torch.optim.Optimizer, named: dict, path: Path) -> None:
    """opt.state_dict()'s per-parameter state as safetensors (no pickle in artifacts), keyed `<parameter name>::<key>`
    rather than by position, so it finds its parameters again in the next iteration's optimizer. Saved from the
    device in the state's own dtype; the hyperparameters are not saved (each iteration sets its own lr)."""
    from safetensors.torch import save_file

    state = opt.state_dict()["state"]
    tensors = {}
    for index, name in enumerate(named):
        for key, value in state.get(index, {}).items():
            tensors[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    save_file(tensors, str(path))


def load_optimizer(opt: torch.optim.Optimizer, named: dict, path: Path) -> None:
    """Through opt.load_state_dict, which casts each moment to its parameter's device and dtype (and the step to what
    a fused or capturable AdamW needs). `named` must list the parameters in the optimizer's order."""
    from safetensors.torch import load_file

    if not path.exists():
        return  # iteration 0: fresh moments
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for index, name in enumerate(named):
        entry = {key.split("::", 1)[1]: v for key, v in tensors.items() if key.split("::", 1)[0] == name}
        if entry:
            entry["step"] = entry["step"].reshape(())
            state[index] = entry
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def save_state(actors: Actors, opts, named, state: dict, steps: int, next_dir: Path) -> None:
    tmp = fresh_tmp_dir(next_dir)
    save_adapters(actors.model, tmp, actors.adapter_names())
    save_value_head(actors.value_head, tmp / CRITIC_ADAPTER)
    if actors.critic_backbone is not None:
        actors.critic_backbone.save_pretrained(tmp / CRITIC_ADAPTER / "backbone", safe_serialization=True)
    (tmp / OPTIMIZER_DIR).mkdir()
    save_optimizer(opts[0], named[0], tmp / OPTIMIZER_DIR / "policy.safetensors")
    save_optimizer(opts[1], named[1], tmp / OPTIMIZER_DIR / "critic.safetensors")
    new_state = {**state, "iteration": state["iteration"] + 1, "global_step": state.get("global_step", 0) + steps}
    write_json(tmp / "state.json", new_state)
    replace_dir(tmp, next_dir)
