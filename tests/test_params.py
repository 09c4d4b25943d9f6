"""Every params error stops with one line naming the key; nothing is written."""

import copy
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run, stage
from rlhf.config.params import ParamsError, load_params, parse_params

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value):
    p = copy.deepcopy(BASE)
    node = p
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    return p


BAD = [
    ("ppo.clip_eps", 0, "ppo.clip_eps"),
    ("ppo.clip_eps", -0.1, "ppo.clip_eps"),
    ("gae.lam", 1.5, "gae.lam"),
    ("gae.lam", -0.1, "gae.lam"),
    ("gae.gamma", 2, "gae.gamma"),
    ("optim.lr", 0, "optim.lr"),
    ("optim.lr", "fast", "optim.lr"),
    ("lora.r", 0, "lora.r"),
    ("lora.dropout", 1.0, "lora.dropout"),
    ("rollout.max_new_tokens", 0, "rollout.max_new_tokens"),
    ("rollout.batch_size", 10, "rollout.batch_size"),  # not divisible by micro-batch × minibatches
    ("rollout.temperature", 0, "rollout.temperature"),
    ("rollout.top_p", 1.5, "rollout.top_p"),
    ("kl.estimator", "k4", "kl.estimator"),
    ("kl.coef", -1, "kl.coef"),
    ("ppo.epochs", 0, "ppo.epochs"),
    ("ppo.vf_coef", 0, "ppo.vf_coef"),
    ("critic.mode", "shared", "critic.mode"),
    ("policy_model.dtype", "float16x", "policy_model.dtype"),
    ("optim.schedule", "step", "optim.schedule"),
    ("paths.next", "../outside", "paths"),
    ("paths.metrics", "/tmp/metrics", "paths"),
    ("seed", -1, "seed"),
    ("data.eval_size", 0, "data.eval_size"),
    ("optim.beta2", 1.0, "optim.beta2"),
    ("optim.lr", float("inf"), "optim.lr"),
    ("optim.lr", float("nan"), "optim.lr"),
    ("kl.coef", float("inf"), "kl.coef"),
    ("critic.head_init_std", float("nan"), "critic.head_init_std"),
    ("policy_model.id", "", "policy_model.id"),
    ("reward_model.id", "  ", "reward_model.id"),
    ("lora.target_modules", [], "lora.target_modules"),
    ("lora.target_modules", ["q_proj", ""], "lora.target_modules"),
    ("paths.current", "", "paths.current"),
    ("runtime.launcher", "", "runtime.launcher"),
    ("kl.in_reward", False, "kl.estimator"),  # with the default k1: a loss term whose gradient is zero
]


def test_kl_as_a_loss_term_needs_an_estimator_with_the_kls_gradient():
    p = with_change("kl.in_reward", False)
    with pytest.raises(ParamsError, match="expected gradient is zero"):
        parse_params(p)
    for estimator in ("k2", "k3"):
        p["kl"]["estimator"] = estimator
        assert parse_params(p).kl.estimator == estimator


@pytest.mark.parametrize("section", sorted(BASE))
def test_every_section_is_required(section):
    p = copy.deepcopy(BASE)
    del p[section]
    with pytest.raises(ParamsError, match=rf"^{section}: missing"):
        parse_params(p)


def test_every_key_is_required():
    p = copy.deepcopy(BASE)
    del p["ppo"]["epochs"]  # the code has no default of its own to fall back on
    with pytest.raises(ParamsError, match=r"^ppo\.epochs: missing"):
        parse_params(p)


def test_defaults_are_valid():
    p = load_params(ROOT / "params.yaml")
    assert p.num_micro_batches == p.rollout.batch_size // p.rollout.micro_batch_size
    with pytest.raises(Exception):
        p.ppo.clip_eps = 0.3  # frozen


@pytest.mark.parametrize("path,value,key", BAD)
def test_bad_value_names_the_key(path, value, key):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(key), msg


def test_unknown_keys_rejected():
    p = copy.deepcopy(BASE)
    p["ppo"]["clip_epsilon"] = 0.2
    with pytest.raises(ParamsError, match=r"^ppo\.clip_epsilon: unknown key$"):
        parse_params(p)
    p = copy.deepcopy(BASE)
    p["ppo_typo"] = {}
    with pytest.raises(ParamsError, match=r"^ppo_typo: unknown key$"):
        parse_params(p)


def test_cli_reports_one_line_and_writes_nothing(tmp_path: Path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("gae.lam", 3)))
    before = set(tmp_path.rglob("*"))
    result = run(stage("prepare"), tmp_path, check=False)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "gae.lam" in lines[0] and "less than or equal to 1" in lines[0], result.stderr
    assert set(tmp_path.rglob("*")) == before


def test_not_yaml(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("ppo: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
