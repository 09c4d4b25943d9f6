"""dvc.yaml's params lists are complete: every params key a stage reads while it runs is listed for that stage (the
key, or its section), so editing it in params.yaml makes the stage stale. The reads are recorded, not guessed: each
stage's `main` runs in this process on a tiny project while the params object notes every field it hands out.
Two configurations run, the tiny default and one with the optional branches switched on (SFT, adaptive KL, KL as a
loss, dual-clip, entropy bonus, a cosine schedule, sampled evaluation, a full critic), because a key read only inside
a branch is still a key the stage depends on."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, make_project, run, stage_main, tiny_params

# Read by a stage, but cannot change what it writes: listing them would rerun stages for nothing.
NO_EFFECT_ON_OUTPUTS = {"runtime.progress": "progress bars only",
                        "runtime.peer_timeout": "how long a rank waits for the others: a failure, never other outputs"}
# Read by the stage runner (rlhf/runtime/stage.py) before `main`, for every stage: torch's thread count. It changes
# the last digits of what a model computes (kernels split their sums by it), so it counts as read by each stage whose
# main runs a model's forward pass, and by no other.
THREADS = "runtime.threads"

SWITCHES = {
    "sft": {"enabled": True, "examples": 8, "epochs": 1, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2,
            "max_grad_norm": 1.0},
    "kl": {"target": 6.0, "in_reward": False, "estimator": "k3"},
    "ppo": {"dual_clip": 3.0, "entropy_coef": 0.01},
    "optim": {"schedule": "cosine", "warmup_iterations": 1, "total_iterations": 10},
    "eval": {"greedy": False, "samples_per_prompt": 2, "reference_cache": None},
    "critic": {"mode": "full"},
    "shaping": {"whiten_rewards": True},
    "rollout": {"max_new_tokens": 40},  # SFT trains only on human summaries that fit the response length
}


@contextmanager
def recorded_reads(params):
    """Yield (reads, strays): the dotted keys of params' leaf fields read inside the block, and reads of sections that
    are not part of this params object (a copy would hide its reads, so the test treats those as a failure)."""
    from rlhf.config.params import _Section

    prefixes: dict[int, str] = {}

    def walk(model, prefix: str) -> None:
        prefixes[id(model)] = prefix
        for name in type(model).model_fields:
            value = model.__dict__[name]
            if isinstance(value, _Section):
                walk(value, f"{prefix}{name}.")

    walk(params, "")
    reads: set[str] = set()
    strays: set[str] = set()

    def spy(self, name):
        value = object.__getattribute__(self, name)
        if name in type(self).model_fields and not isinstance(value, _Section):
            prefix = prefixes.get(id(self))
            (reads.add(prefix + name) if prefix is not None else strays.add(f"{type(self).__name__}.{name}"))
        return value

    _Section.__getattribute__ = spy
    try:
        yield reads, strays
    finally:
        del _Section.__getattribute__


@contextmanager
def model_forwards():
    """Yield a list that counts the forward calls of torch modules inside the block."""
    import torch

    calls: list[int] = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def listed_params(stage: dict) -> list[str]:
    return [p for p in stage.get("params", []) if isinstance(p, str)]


def within(key: str, listed: str) -> bool:
    """key is the listed key or inside the listed section"""
    return key == listed or key.startswith(listed + ".")


def covered(key: str, stage: dict) -> bool:
    if any(within(key, p) for p in listed_params(stage)):
        return True
    # A path key is part of the stage's definition wherever the stage uses it as ${paths.…} (deps, outs, metrics)
    return key.startswith("paths.") and "${" + key + "}" in yaml.safe_dump(stage)


def reads_per_stage(repo: Path, monkeypatch) -> dict[str, set[str]]:
    """Run every stage of dvc.yaml, in order, in this process; the params keys each one read."""
    from rlhf.config.params import load_params

    monkeypatch.chdir(repo)
    found = {}
    for name, stage in dvc_stages().items():
        if name == "sample":  # iteration 0 from what the set-up stages just wrote here (the SFT adapter's bytes
            run(["rlhf", "init"], repo)  # depend on the thread count, and the state records which adapter it is on)
        words = stage["cmd"].split()
        script = next(w for w in words if w.startswith("stages/"))
        args = words[words.index(script) + 1:]
        params = load_params(repo / "params.yaml")  # validation reads every key; only main's reads count
        with recorded_reads(params) as (reads, strays), model_forwards() as forwards:
            stage_main(Path(script).stem)(params, *args)
        assert not strays, f"stage {name} read params through a copy the test cannot attribute: {sorted(strays)}"
        assert reads, f"stage {name}: no params read recorded (is the recorder still hooked in?)"
        found[name] = reads | ({THREADS} if forwards else set())
    return found


CONFIGURATIONS = {"default": {}, "switches-on": SWITCHES}


@pytest.fixture(scope="module")
def reads(tmp_path_factory, tiny_policy, tiny_reward, one_thread) -> dict[str, dict[str, set[str]]]:
    """{configuration: {stage: keys read}}"""
    found = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, switches in CONFIGURATIONS.items():
            params = tiny_params(tiny_policy, tiny_reward, **switches)
            repo = make_project(tmp_path_factory.mktemp(name) / "repo", params)
            found[name] = reads_per_stage(repo, monkeypatch)
    return found


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_every_params_key_a_stage_reads_is_listed_for_it_in_dvc_yaml(reads, configuration):
    stages = dvc_stages()
    missing = {stage: sorted(k for k in keys if not covered(k, stages[stage]) and k not in NO_EFFECT_ON_OUTPUTS)
               for stage, keys in reads[configuration].items()}
    assert not any(missing.values()), f"read but not listed in dvc.yaml: { {k: v for k, v in missing.items() if v} }"
    # The run went through the branches it was meant to (a silently skipped branch would prove nothing)
    everything = set().union(*reads[configuration].values())
    assert {"sft.enabled", "eval.greedy", "kl.in_reward", "ppo.dual_clip", "critic.mode"} <= everything
    model_stages = {stage for stage, keys in reads[configuration].items() if THREADS in keys}
    assert {"rollout", "reward", "reference", "update", "evaluate"} <= model_stages
    assert not {"policy_model", "reward_model", "prepare", "sample", "advantages"} & model_stages
    if CONFIGURATIONS[configuration]:
        assert {"sft.lr", "kl.target", "kl.horizon", "optim.warmup_iterations", "eval.samples_per_prompt"} <= everything


def test_no_stage_lists_a_params_key_it_never_reads(reads):
    """The other direction, so a params edit does not rerun stages it cannot affect: each listed key (or some key of
    a listed section) is read by the stage in at least one of the two configurations."""
    never = []
    for stage, definition in dvc_stages().items():
        read = set().union(*(r[stage] for r in reads.values()))
        never += [f"{stage}: {listed}" for listed in listed_params(definition)
                  if not any(within(k, listed) for k in read)]
    assert not never, f"listed in dvc.yaml but never read: {never}"


def test_the_recorder_sees_reads_inside_methods_and_only_leaf_keys():
    from rlhf.config.params import parse_params

    params = parse_params(tiny_params(Path("policy"), Path("reward"), kl={"target": 6.0}))
    with recorded_reads(params) as (reads, strays):
        params.kl_coef({"kl_coef": 0.1})
        _ = params.micro_batches_per_minibatch
    # kl_coef reads kl.coef too: it is the default of its state lookup
    assert reads == {"kl.target", "kl.coef", "rollout.batch_size", "rollout.micro_batch_size", "ppo.num_minibatches"}
    assert not strays
    _ = params.seed  # unhooked again
    assert "seed" not in reads


def test_covered_needs_the_key_its_section_or_a_path_template():
    stage = {"params": ["ppo", "lora.r"], "deps": ["${paths.current}"]}
    assert covered("ppo.clip_eps", stage) and covered("lora.r", stage) and covered("paths.current", stage)
    assert not covered("lora.alpha", stage) and not covered("paths.next", stage) and not covered("ppo_x", stage)
