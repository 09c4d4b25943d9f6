"""Typed, frozen, validated view of params.yaml.

params.yaml is the single source of hyperparameters and paths. Every section is a frozen pydantic model with
`extra="forbid"`, so an unknown key, a wrong type or an out-of-range value stops with one line naming the key.
Derived sizes (micro-batches per minibatch, ...) are properties here, never written back into the YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EMBEDDED_POLICY = "embedded:smollm2-135m-instruct"
EMBEDDED_SCORER = "embedded:all-minilm-l6-v2"


class ParamsError(ValueError):
    """A params problem, rendered as one line that names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, validate_default=True)


class Paths(_Section):
    source_data: str = "data/tldr/validation-1945.parquet"
    policy_model: str = "models/base/policy"
    reward_model: str = "models/base/reward"
    current: str = "models/current"
    next: str = "models/next"
    prepared: str = "data/prepared"
    iteration: str = "data/iteration"
    metrics: str = "metrics"

    @model_validator(mode="after")
    def _inside_project(self) -> "Paths":
        for key, value in self.model_dump().items():
            p = Path(value)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"{key}: path must be relative and stay inside the project (got {value!r})")
        return self


class PolicyModel(_Section):
    id: str = EMBEDDED_POLICY
    revision: str | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    trust_remote_code: bool = False
    prompt_format: Literal["raw", "chat"] = "raw"
    # chunked: our causal attention for the unpadded training/scoring passes (stages/attention.py), SDPA elsewhere
    attention: Literal["chunked", "sdpa", "eager"] = "chunked"
    # A separate frozen reference model; null means "the policy with its LoRA adapter disabled".
    reference: str | None = None


class RewardModel(_Section):
    id: str = EMBEDDED_SCORER
    revision: str | None = None
    kind: Literal["similarity", "classifier"] = "similarity"
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False
    attention: Literal["chunked", "sdpa", "eager"] = "sdpa"  # chunked only helps causal (decoder) reward models
    max_length: int = Field(1024, ge=16)
    token_budget: int = Field(8192, ge=16)


class Data(_Section):
    source: str = "local"  # "local" (paths.source_data) or a hub dataset id such as trl-lib/tldr
    split: str = "validation"
    eval_size: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(512, ge=8)
    overlong: Literal["drop", "truncate"] = "drop"


class Lora(_Section):
    r: int = Field(32, ge=1)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Critic(_Section):
    mode: Literal["lora", "full"] = "lora"
    lora_r: int = Field(32, ge=1)
    lora_alpha: float = Field(64.0, gt=0)
    # Small on purpose: with a random head of std 1/sqrt(d) the initial values have std ~ |h|/sqrt(d) ≫ the reward's,
    # and with λ≈1 that noise, not the score, would drive the first updates.
    head_init_std: float = Field(1e-3, ge=0)


class Rollout(_Section):
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(53, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    micro_batch_size: int = Field(4, ge=1)
    generation_chunk: int = Field(16, ge=1)  # prompts per generate() call; the unit shared out across processes


class KL(_Section):
    coef: float = Field(0.05, ge=0)
    estimator: Literal["k1", "k2", "k3"] = "k1"
    in_reward: bool = True


class Shaping(_Section):
    missing_eos_penalty: float | None = Field(None, ge=0)
    whiten_rewards: bool = False


class Gae(_Section):
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True


class Ppo(_Section):
    epochs: int = Field(4, ge=1)
    num_minibatches: int = Field(2, ge=1)
    clip_eps: float = Field(0.2, gt=0)
    clip_eps_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)


class Optim(_Section):
    lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_iterations: int = Field(0, ge=0)
    total_iterations: int = Field(10, ge=1)


class Eval(_Section):
    greedy: bool = True
    max_new_tokens: int = Field(53, ge=1)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    table_rows: int = Field(8, ge=0)


class Train(_Section):
    iterations: int = Field(3, ge=1)


class Runtime(_Section):
    launcher: str = ""  # prefix for the data-parallel stages' commands in dvc.yaml (torchrun / accelerate launch)
    threads: int = Field(0, ge=0)  # 0: torch's default
    progress: Literal["auto", "on", "off"] = "auto"
    warm_start: bool = True  # model stages fork from one process that has imported torch/transformers (stages/warm.py)


class Params(_Section):
    seed: int = Field(42, ge=0)
    paths: Paths = Paths()
    policy_model: PolicyModel = PolicyModel()
    reward_model: RewardModel = RewardModel()
    data: Data = Data()
    lora: Lora = Lora()
    critic: Critic = Critic()
    rollout: Rollout = Rollout()
    kl: KL = KL()
    shaping: Shaping = Shaping()
    gae: Gae = Gae()
    ppo: Ppo = Ppo()
    optim: Optim = Optim()
    eval: Eval = Eval()
    train: Train = Train()
    runtime: Runtime = Runtime()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        mb, groups = self.rollout.micro_batch_size, self.ppo.num_minibatches
        if self.rollout.batch_size % (mb * groups) != 0:
            raise ValueError(
                f"rollout.batch_size: must be divisible by rollout.micro_batch_size × ppo.num_minibatches "
                f"= {mb} × {groups} (got {self.rollout.batch_size})"
            )
        if self.reward_model.id == EMBEDDED_SCORER and self.reward_model.kind != "similarity":
            raise ValueError("reward_model.kind: the embedded MiniLM scorer only supports 'similarity'")
        return self

    @property
    def micro_batches_per_minibatch(self) -> int:
        return self.rollout.batch_size // (self.rollout.micro_batch_size * self.ppo.num_minibatches)

    @property
    def num_micro_batches(self) -> int:
        return self.rollout.batch_size // self.rollout.micro_batch_size


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or msg.startswith(loc) else f" (got {got!r})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}"


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
