"""Typed, frozen, validated view of params.yaml.

params.yaml is the single source of hyperparameters and paths: the models here declare types and ranges but no
default values, so a params file must set every key (a missing section or key stops with one line naming it, and
the code can never silently run with values of its own). Every section is a frozen pydantic model with
`extra="forbid"`, so an unknown key, a wrong type or an out-of-range value stops with one line naming the key. Two
slips YAML itself lets through stop the same way: a key written twice in one mapping (YAML keeps the last one) and
a boolean where a number goes (pydantic would read `true` as 1), or anything but true/false where a boolean goes.
Derived sizes (micro-batches per minibatch, ...) are properties here, never written back into the YAML.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo, field_validator,
                      model_validator)

EMBEDDED_POLICY = "embedded:smollm2-135m-instruct"
EMBEDDED_SCORER = "embedded:all-minilm-l6-v2"


class ParamsError(ValueError):
    """A params problem, rendered as one line that names the key."""


def _union_members(annotation) -> set:
    if get_origin(annotation) in (Union, types.UnionType):
        return set(get_args(annotation))
    return {annotation}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, validate_default=True, allow_inf_nan=False,
                              str_strip_whitespace=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_only_where_booleans_go(cls, value, info: ValidationInfo):
        # pydantic's lax mode reads `true` as 1 for an int or float and 1 or "yes" as true for a bool
        takes = _union_members(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in takes:
            raise ValueError("a boolean where a number is expected" if takes & {int, float} else
                             "a boolean where none is expected")
        if bool in takes and value is not None and not isinstance(value, bool):
            raise ValueError("must be true or false")
        return value


NonEmpty = Field(min_length=1)


class Paths(_Section):
    source_data: str = NonEmpty
    policy_model: str = NonEmpty
    reward_model: str = NonEmpty
    current: str = NonEmpty
    next: str = NonEmpty
    prepared: str = NonEmpty
    sft: str = NonEmpty
    iteration: str = NonEmpty
    metrics: str = NonEmpty

    @model_validator(mode="after")
    def _inside_project(self) -> "Paths":
        for key, value in self.model_dump().items():
            p = Path(value)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"{key}: path must be relative and stay inside the project (got {value!r})")
        return self


class PolicyModel(_Section):
    id: str = NonEmpty
    revision: str | None
    dtype: Literal["auto", "float32", "bfloat16"]
    trust_remote_code: bool
    prompt_format: Literal["raw", "chat"]
    # The text the policy is given (the chat user turn, or the whole prompt when raw): "{post}" stands for the source
    # prompt without its closing "TL;DR:" cue. null: the source prompt as it is.
    instruction: str | None
    # chunked: our causal attention for the unpadded training/scoring passes (rlhf/models/attention.py), SDPA elsewhere;
    # auto: chunked on the CPU, SDPA on CUDA (rlhf/runtime/device.py)
    attention: Literal["auto", "chunked", "sdpa", "eager"]
    # A separate frozen reference model; null means "the policy with its LoRA adapter disabled".
    reference: str | None

    @field_validator("instruction")
    @classmethod
    def _instruction_has_post(cls, value: str | None) -> str | None:
        if value is not None and value.count("{post}") != 1:
            raise ValueError(f"must contain {{post}} (where the post goes) exactly once, got {value!r}")
        return value


class RewardModel(_Section):
    id: str = NonEmpty
    revision: str | None
    kind: Literal["similarity", "classifier"]
    dtype: Literal["auto", "float32", "bfloat16"]
    trust_remote_code: bool
    attention: Literal["auto", "chunked", "sdpa", "eager"]  # chunked only helps causal (decoder) reward models
    max_length: int = Field(ge=16)
    token_budget: int = Field(ge=16)


class Data(_Section):
    source: str  # "local" (paths.source_data) or a hub dataset id such as trl-lib/tldr
    split: str
    eval_size: int = Field(ge=1)
    split_seed: int = Field(ge=0)  # the held-out split only: other seeds keep the same held-out prompts
    max_prompt_tokens: int = Field(ge=8)
    overlong: Literal["drop", "truncate"]


class Lora(_Section):
    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: tuple[Annotated[str, StringConstraints(min_length=1)], ...] = Field(min_length=1)


class Critic(_Section):
    mode: Literal["lora", "full"]
    lora_r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    # Small on purpose: with a random head of std 1/sqrt(d) the initial values have std ~ |h|/sqrt(d) ≫ the reward's,
    # and with λ≈1 that noise, not the score, would drive the first updates.
    head_init_std: float = Field(ge=0)


class Sft(_Section):
    # The optional warm start before PPO: LoRA fine-tuning of the policy on the human summaries of the training
    # prompts (rlhf/training/sft.py), merged into the base that the policy, reference and critic share.
    enabled: bool
    examples: int | None = Field(ge=1)  # training prompts used (a seeded shuffle's first); null: all
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # examples per optimizer step
    micro_batch_size: int = Field(ge=1)  # examples per forward pass
    lr: float = Field(gt=0)
    max_grad_norm: float | None = Field(gt=0)

    @model_validator(mode="after")
    def _whole_micro_batches(self) -> "Sft":
        if self.batch_size % self.micro_batch_size != 0:
            raise ValueError(f"sft.batch_size: must be divisible by sft.micro_batch_size = {self.micro_batch_size} "
                             f"(got {self.batch_size})")
        return self


class Rollout(_Section):
    batch_size: int = Field(ge=1)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    micro_batch_size: int = Field(ge=1)
    generation_chunk: int = Field(ge=1)  # prompts per generate() call; the unit shared out across processes


class KL(_Section):
    coef: float = Field(ge=0)  # β, or with a target the β of iteration 0
    estimator: Literal["k1", "k2", "k3"]
    in_reward: bool
    target: float | None = Field(gt=0)  # adaptive controller (Ziegler et al. 2019); null: β stays kl.coef
    horizon: int = Field(ge=1)  # the controller's horizon, in responses

    @model_validator(mode="after")
    def _gradient_is_the_kl(self) -> "KL":
        # As a loss term only the gradient matters: k1 = log π − log π_ref has E_π[∇k1] = E_π[∇log π] = 0, so the
        # penalty would silently do nothing. k2's gradient is the KL's; k3's is the reverse KL's.
        if not self.in_reward and self.estimator == "k1":
            raise ValueError("kl.estimator: k1 cannot be a loss term (kl.in_reward: false): its expected gradient is "
                             "zero, so the penalty would do nothing; use k2 or k3, or kl.in_reward: true")
        if self.target is not None and self.coef == 0:
            # the controller multiplies β, so from 0 it never moves
            raise ValueError("kl.coef: the adaptive controller (kl.target set) needs a starting kl.coef > 0")
        return self


class Shaping(_Section):
    missing_eos_penalty: float | None = Field(ge=0)
    whiten_rewards: bool


class Gae(_Section):
    gamma: float = Field(ge=0, le=1)
    lam: float = Field(ge=0, le=1)
    whiten_advantages: bool


class Ppo(_Section):
    epochs: int = Field(ge=1)
    num_minibatches: int = Field(ge=1)
    clip_eps: float = Field(gt=0)
    clip_eps_value: float = Field(gt=0)
    vf_coef: float = Field(gt=0)
    max_grad_norm: float | None = Field(gt=0)
    dual_clip: float | None = Field(gt=1)  # c of dual-clip PPO (Ye et al. 2020); null: off
    entropy_coef: float = Field(ge=0)  # entropy bonus; 0: none (and no gradient through the entropy)


class Optim(_Section):
    lr: float = Field(gt=0)
    critic_lr: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    beta1: float = Field(ge=0, lt=1)
    beta2: float = Field(ge=0, lt=1)
    eps: float = Field(gt=0)
    # Adam's moments carried across iterations shrink its step as their history grows; reset: each iteration starts
    # them afresh (the next iteration's batch is new data, so the old moments describe another objective)
    reset_moments: bool
    schedule: Literal["constant", "linear", "cosine"]
    warmup_iterations: int = Field(ge=0)
    total_iterations: int = Field(ge=1)


class Eval(_Section):
    greedy: bool
    samples_per_prompt: int = Field(ge=1)  # when not greedy; their mean reward is the prompt's
    generation_chunk: int = Field(ge=1)  # held-out prompts decoded together (the seeding unit when sampling)
    max_new_tokens: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_p: float = Field(gt=0, le=1)
    table_rows: int = Field(ge=0)
    bootstrap_resamples: int = Field(ge=10_000)  # fewer makes the interval's own Monte-Carlo noise visible
    interval_level: float = Field(gt=0, lt=1)
    # Folder keeping the frozen reference's keys/values over the held-out prompts between iterations
    # (rlhf/models/reference_cache.py); null: computed at every evaluation
    reference_cache: str | None = Field(min_length=1)

    @field_validator("reference_cache")
    @classmethod
    def _cache_inside_project(cls, value: str | None) -> str | None:
        if value is not None and (Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError(f"path must be relative and stay inside the project (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_greedy_summary(self) -> "Eval":
        if self.greedy and self.samples_per_prompt != 1:
            raise ValueError("eval.samples_per_prompt: greedy decoding gives one summary per prompt; set it to 1 or "
                             f"eval.greedy: false (got {self.samples_per_prompt})")
        return self


class Train(_Section):
    iterations: int = Field(ge=1)


class Runtime(_Section):
    launcher: str = Field(min_length=1)  # runs the data-parallel stages' scripts in dvc.yaml (or torchrun)
    peer_timeout: int = Field(ge=1)  # seconds a data-parallel rank waits for the others before the stage fails

    @field_validator("launcher")
    @classmethod
    def _nodes_can_meet(cls, value: str) -> str:
        check_multinode_launcher(value)
        return value
    threads: int = Field(ge=0)  # 0: one per physical core the command may run on (rlhf/runtime/numerics.py)
    progress: Literal["auto", "on", "off"]
    warm_start: bool  # model stages fork from one process that has imported torch/transformers (rlhf/runtime/warm_start.py)
    device: Literal["auto", "cpu", "cuda", "meta"]  # auto: CUDA when torch sees it; meta: shapes only (tests)


def torchrun_options(launcher: str) -> dict[str, str] | None:
    """The options of the torchrun in a launcher line (`torchrun ...`, `rlhf torchrun ...`, after `srun ...`), as
    {"--nnodes": "2", "--standalone": "", ...} with torchrun's underscore spellings read as dashes; None: no
    torchrun. Only what comes before the first non-option word (the stage script) counts."""
    import shlex

    try:
        words = shlex.split(launcher)
    except ValueError:
        return None
    if "torchrun" not in words:
        return None
    options: dict[str, str] = {}
    rest = words[words.index("torchrun") + 1:]
    flags = {"--standalone", "--no-python", "--no_python", "-m", "--module", "--run-path", "--run_path"}
    i = 0
    while i < len(rest) and rest[i].startswith("-"):
        word = rest[i]
        name, eq, value = word.partition("=")
        name = "--" + name[2:].replace("_", "-") if name.startswith("--") else name
        if eq or name in flags or i + 1 >= len(rest):
            options[name] = value
            i += 1
        else:
            options[name] = rest[i + 1]
            i += 2
    return options


def check_multinode_launcher(launcher: str) -> None:
    """A torchrun over several nodes must say where they meet: without an endpoint each node would wait for the
    others at its own address until the join timeout, and --standalone makes every node a world of its own."""
    options = torchrun_options(launcher)
    if options is None or "--nnodes" not in options:
        return
    nodes = options["--nnodes"].split(":")[-1]
    if nodes.startswith("$"):
        pass  # the shell fills it in ($SLURM_NNODES): a line written for several nodes
    elif not nodes.isdigit():
        raise ValueError(f"torchrun --nnodes takes N or MIN:MAX (got {options['--nnodes']!r})")
    elif int(nodes) <= 1:
        return
    if "--standalone" in options:
        raise ValueError("torchrun --standalone is one node; several nodes meet at a rendezvous: drop --standalone "
                         "and give --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB")
    if options.get("--rdzv-backend", "static") == "c10d":
        missing = [o for o in ("--rdzv-endpoint", "--rdzv-id") if not options.get(o)]
        if missing:
            raise ValueError(f"torchrun --nnodes {options['--nnodes']} with the c10d rendezvous needs "
                             f"{' and '.join(missing)} (the first node's HOST:PORT, and one id per job)")
        host, colon, port = options["--rdzv-endpoint"].rpartition(":")
        if not (host and colon and (port.isdigit() or port.startswith("$"))):
            raise ValueError(f"torchrun --rdzv-endpoint takes HOST:PORT (got {options['--rdzv-endpoint']!r})")
    elif not options.get("--master-addr"):
        raise ValueError(f"torchrun --nnodes {options['--nnodes']} needs a meeting point: --rdzv-backend c10d "
                         "--rdzv-endpoint HOST:PORT --rdzv-id JOB (or --master-addr with --node-rank)")


class Params(_Section):
    seed: int = Field(ge=0)
    paths: Paths
    policy_model: PolicyModel
    reward_model: RewardModel
    data: Data
    lora: Lora
    critic: Critic
    sft: Sft
    rollout: Rollout
    kl: KL
    shaping: Shaping
    gae: Gae
    ppo: Ppo
    optim: Optim
    eval: Eval
    train: Train
    runtime: Runtime

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

    def kl_coef(self, state: dict) -> float:
        """β of the iteration whose state.json is `state`: kl.coef, or with the adaptive controller the β it
        carries (a state written before the controller existed starts it from kl.coef)."""
        if self.kl.target is None:
            return self.kl.coef
        return float(state.get("kl_coef", self.kl.coef))

    def check_schedule_horizon(self, last_iteration: int) -> None:
        """A decaying schedule's LR is 0 from optim.total_iterations on: an iteration there would silently train
        nothing, so it is a params error."""
        o = self.optim
        if o.schedule != "constant" and last_iteration >= o.total_iterations:
            raise ParamsError(f"optim.total_iterations: iteration {last_iteration} is past the {o.schedule} schedule's "
                              f"horizon of {o.total_iterations} iterations (its learning rate would be 0); raise "
                              "optim.total_iterations or set optim.schedule: constant")

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
    if first["type"] == "missing":
        return f"{loc}: missing (params.yaml sets every key; `rlhf params-doc` lists them)"
    if loc and msg.startswith(f"{loc}."):  # a section's own check that names the full key
        return msg
    got = first.get("input")
    as_written = str(got).lower() if isinstance(got, bool) else repr(got)  # true/false as in YAML
    shown = "" if isinstance(got, dict) or msg.startswith(loc) else f" (got {as_written})"
    return f"{loc}: {msg}{shown}" if loc else f"{msg}"


def parse_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err)) from None


def _refuse_repeated_keys(node: yaml.Node, where: tuple[str, ...] = ()) -> None:
    """A key written twice in one mapping: YAML silently keeps the last value, which is never what a user editing
    params.yaml meant."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            line = key.start_mark.line + 1
            if name in first_line:
                raise ParamsError(f"{'.'.join((*where, name))}: set twice (lines {first_line[name]} and {line}); "
                                  "YAML would keep only the second, so delete one")
            first_line[name] = line
            _refuse_repeated_keys(value, (*where, name))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_repeated_keys(item, (*where, str(i)))


def decode_utf8(path: Path) -> str:
    """The file's text; YAML (and DVC, which reads params.yaml too) wants UTF-8, and a file saved in a legacy
    encoding otherwise fails deep inside the YAML reader, far from the byte to fix."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ParamsError(f"{path}: not valid UTF-8 (byte 0x{data[err.start]:02x} on line {line}); "
                          "save the file as UTF-8") from None


def read_yaml(path: str | Path) -> dict | None:
    """The params file's mapping, unvalidated; a missing file, broken YAML or a repeated key is a ParamsError."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found")
    text = decode_utf8(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    try:
        _refuse_repeated_keys(yaml.compose(text, Loader=yaml.SafeLoader))
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = read_yaml(path)
    try:
        return parse_params(raw)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None
