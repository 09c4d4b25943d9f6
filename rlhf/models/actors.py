"""The models of one PPO iteration on one shared base: the policy (LoRA adapter "policy"), the reference (the same
model with adapters disabled) and, with `critic.mode: lora`, the critic (LoRA adapter "critic" + a linear value
head). Also the fused LoRA forward every stage runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from rlhf.runtime.device import Device

POLICY_ADAPTER = "policy"
CRITIC_ADAPTER = "critic"

@dataclass
class Actors:
    """The models of one PPO iteration. `model` is a PeftModel over the shared base."""

    model: nn.Module
    tokenizer: object
    value_head: nn.Linear
    critic_backbone: nn.Module | None  # only for critic.mode == "full"; else the shared base with adapter "critic"
    reference: nn.Module | None  # only when policy_model.reference names a separate model
    stop_ids: list[int]
    trainable: bool
    device: Device  # where every tensor of a pass lives; bf16 base: LoRA/critic stay fp32, matmuls run in bf16
    # False: loaded without the reference (rollout, update never run it); a reference pass then refuses instead of
    # silently using the adapter-disabled base in place of a separate policy_model.reference
    reference_loaded: bool = True

    tuner_layers: list = field(default_factory=list)  # peft's adapter layers, found once at load
    adapter_params: list = field(default_factory=list)  # every LoRA A/B tensor of both adapters

    def __post_init__(self) -> None:
        self.tuner_layers = adopt_lora_layers(self.model, self.device)
        self.adapter_params = [p for layer in self.tuner_layers for n, p in layer.named_parameters()
                               if "lora_" in n]

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the ids a token artifact may hold."""
        return self.model.get_input_embeddings().num_embeddings

    def compute(self) -> contextlib.AbstractContextManager:
        """The numeric context of every forward pass (autocast with a bf16 base, see __post_init__). Rollout,
        reference and update all run inside it, so the first-minibatch ratio stays exactly 1."""
        return self.device.compute()

    def use(self, adapter: str) -> None:
        """Route the LoRA layers through `adapter`: what PeftModel.set_adapter does for LoRA, over the layers found
        at load instead of a walk over every module of the model per call (~45 ms here, twice per micro-batch)."""
        if adapter not in self.model.peft_config:
            raise ValueError(f"adapter {adapter!r} not loaded")
        self.model.active_adapter = adapter
        self.model.base_model.active_adapter = adapter
        for layer in self.tuner_layers:
            layer.set_adapter(adapter)
        if self.trainable:  # peft's set_adapter freezes the inactive adapter; both are trained
            for param in self.adapter_params:
                param.requires_grad_(True)

    def adapter_names(self) -> list[str]:
        return [n for n in (POLICY_ADAPTER, CRITIC_ADAPTER) if n in self.model.peft_config]


def adopt_lora_layers(model: nn.Module, device: Device) -> list:
    """The model's LoRA layers, with the fused forward and, under autocast, without peft's input casting. With a
    bf16 base, peft would cast each projection's input to the fp32 adapter dtype (an fp32 LoRA matmul plus two
    full-activation copies per projection); every forward runs under autocast instead (Device.compute()), which
    casts the adapters' fp32 master weights to bf16 per call, and gradients still reach them in fp32. Set once
    here: peft's disable_input_dtype_casting() walks all modules on every entry."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    install_fused_lora(layers)
    if device.autocast_dtype is not None:
        for layer in layers:
            layer.cast_input_dtype_enabled = False
    return layers


def install_fused_lora(layers: list) -> None:
    """Give peft's LoRA Linear layers the forward below (per instance; peft's class is untouched)."""
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    for layer in layers:
        if type(layer) is LoraLinear:
            layer.forward = types.MethodType(fused_lora_forward, layer)


def fused_lora_forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """y = W x + (s·B)(A x) with the adapter term added inside the GEMM (addmm) and its scale s = α/r folded into
    the small B. peft computes base, then B(A x), scales it and adds it: two more passes over the (tokens, out)
    activation in forward and two in backward, for every projection (~5% of an update step here). Anything but the
    plain case every stage runs (one active adapter, adapters on, not merged, no dropout, DoRA or adapter bias,
    no extra arguments) goes to peft's own forward."""
    names = layer.active_adapters
    name = names[0] if len(names) == 1 else None
    if (args or kwargs or layer.disable_adapters or layer.merged or name not in layer.lora_A
            or layer.use_dora.get(name) or layer.lora_B[name].bias is not None
            or not _inactive_dropout(layer.lora_dropout[name])):
        return type(layer).forward(layer, x, *args, **kwargs)
    result = layer.base_layer(x)  # (..., out)
    if layer.cast_input_dtype_enabled:  # fp32 base: peft would cast x to the adapter dtype
        x = x.to(layer.lora_A[name].weight.dtype)
    h = F.linear(x, layer.lora_A[name].weight)  # (..., r)
    scaled_b = layer.lora_B[name].weight * layer.scaling[name]  # (out, r)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), scaled_b.t())  # (N, out)
    return out.view(result.shape)


def _inactive_dropout(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and (module.p == 0 or not module.training))


@contextlib.contextmanager
def quiet_peft_wrap():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model, which prints a
    FutureWarning in every model stage; only that warning is silenced, only there."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def lora_config(r: int, alpha: float, dropout: float, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      task_type="CAUSAL_LM")


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)
