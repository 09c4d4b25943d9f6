"""Every params error stops with one line naming the key; nothing is written."""

import copy
import re
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
    ("sft.examples", 0, "sft.examples"),
    ("sft.epochs", 0, "sft.epochs"),
    ("sft.lr", 0, "sft.lr"),
    ("sft.batch_size", 6, "sft.batch_size"),  # not divisible by sft.micro_batch_size (4)
    ("sft.max_grad_norm", 0, "sft.max_grad_norm"),
    ("paths.sft", "", "paths.sft"),
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
    ("data.split_seed", -1, "data.split_seed"),
    ("data.split_seed", 1.5, "data.split_seed"),
    ("optim.reset_moments", "sometimes", "optim.reset_moments"),
    ("optim.reset_moments", None, "optim.reset_moments"),
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
    ("kl.target", 0, "kl.target"),
    ("kl.target", -1.0, "kl.target"),
    ("kl.horizon", 0, "kl.horizon"),
    ("kl.horizon", 1.5, "kl.horizon"),
    ("ppo.dual_clip", 1.0, "ppo.dual_clip"),  # c ≤ 1 would cap the loss below the clipped surrogate
    ("ppo.entropy_coef", -0.01, "ppo.entropy_coef"),
    ("ppo.entropy_coef", None, "ppo.entropy_coef"),
    ("runtime.peer_timeout", 0, "runtime.peer_timeout"),
]


@pytest.mark.parametrize("launcher, message", [
    ("torchrun --standalone --nnodes 2 --nproc-per-node 8", "--standalone is one node"),
    ("torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-id j", "needs --rdzv-endpoint"),
    ("torchrun --nnodes $SLURM_NNODES --rdzv_backend=c10d --rdzv_endpoint=node1:29500", "needs --rdzv-id"),
    ("srun rlhf torchrun --nnodes 2 --rdzv-backend c10d --rdzv-endpoint node1 --rdzv-id j", "takes HOST:PORT"),
    ("torchrun --nnodes 2 --nproc-per-node 8", "needs a meeting point"),
])
def test_a_multinode_launcher_must_say_where_the_nodes_meet(launcher, message):
    with pytest.raises(ParamsError, match=rf"^runtime\.launcher: .*{re.escape(message)}"):
        parse_params(with_change("runtime.launcher", launcher))


@pytest.mark.parametrize("launcher", [
    "python", "torchrun --standalone --nproc-per-node 8", "torchrun --nnodes 1 --nproc-per-node 2",
    "torchrun --nnodes 1:2 --rdzv-backend c10d --rdzv-endpoint h:1 --rdzv-id j",
    "torchrun --nnodes 2 --node-rank 0 --master-addr h --master-port 29500",
])
def test_one_node_and_complete_multinode_launchers_pass(launcher):
    assert parse_params(with_change("runtime.launcher", launcher)).runtime.launcher == launcher


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


def edited(tmp_path: Path, before: str, after: str) -> Path:
    """params.yaml as a user edits it: the shipped file, comments and all, with one text change."""
    text = (ROOT / "params.yaml").read_text()
    assert text.count(before) == 1, before
    (tmp_path / "params.yaml").write_text(text.replace(before, after))
    return tmp_path / "params.yaml"


def line_of(path: Path, start: str, after: int = 0) -> int:
    lines = path.read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if i > after and line.startswith(start))


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path: Path):
    """YAML keeps the last of two equal keys, so `lr:` written twice in optim once trained with the second."""
    path = edited(tmp_path, "optim:\n", "optim:\n  lr: 1.0e-3                   # tried first\n")
    optim = line_of(path, "optim:")
    first, second = optim + 1, line_of(path, "  lr:", after=optim + 1)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value) == (f"{path}: optim.lr: set twice (lines {first} and {second}); YAML would keep only the "
                              "second, so delete one")


def test_the_same_key_in_two_sections_is_fine():
    p = load_params(ROOT / "params.yaml")  # lr and batch_size are each in two sections
    assert (p.sft.lr, p.optim.lr) == (BASE["sft"]["lr"], BASE["optim"]["lr"])
    assert (p.sft.batch_size, p.rollout.batch_size) == (BASE["sft"]["batch_size"], BASE["rollout"]["batch_size"])


def test_a_section_written_twice_is_refused(tmp_path: Path):
    text = (ROOT / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text + "train:\n  iterations: 2\n")
    with pytest.raises(ParamsError, match=r"train: set twice \(lines \d+ and \d+\)"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("path,value", [("rollout.batch_size", True), ("optim.lr", False), ("seed", True),
                                        ("ppo.max_grad_norm", True), ("sft.examples", True)])
def test_a_boolean_where_a_number_goes_is_refused(path, value):
    """pydantic's lax mode once read `rollout.batch_size: true` as a batch of 1."""
    with pytest.raises(ParamsError) as err:
        parse_params(with_change(path, value))
    assert str(err.value) == f"{path}: a boolean where a number is expected (got {str(value).lower()})"


@pytest.mark.parametrize("value", [1, 0, "yes", "true"])
def test_a_boolean_key_takes_only_true_or_false(value):
    with pytest.raises(ParamsError) as err:
        parse_params(with_change("eval.greedy", value))
    assert str(err.value) == f"eval.greedy: must be true or false (got {value!r})"


@pytest.mark.parametrize("before,after,message", [
    ("optim:\n", "optim:\n  lr: 1.0e-3\n", "optim.lr: set twice"),
    ("  batch_size: 32 ", "  batch_size: true ", "rollout.batch_size: a boolean where a number is expected"),
])
def test_edited_params_stop_a_stage_and_the_cli_with_one_line(tmp_path: Path, before, after, message):
    """Through a stage script (as `dvc repro` runs it) and through `rlhf check-params`: exit code 2, one line."""
    edited(tmp_path, before, after)
    for cmd in (stage("prepare"), ["rlhf", "check-params"]):
        result = run(cmd, tmp_path, check=False)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], (cmd, result.stderr)
        assert lines[0].startswith("error: params.yaml: ")


def test_preset_refuses_a_key_written_twice_and_leaves_the_file_alone(tmp_path: Path):
    """`rlhf preset` rewrites params.yaml through ruamel, whose own refusal was a multi-line traceback."""
    path = edited(tmp_path, "optim:\n", "optim:\n  lr: 1.0e-3\n")
    before = path.read_text()
    result = run(["rlhf", "preset", "qwen3-skywork"], tmp_path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "optim.lr: set twice" in lines[0], result.stderr
    assert path.read_text() == before


def test_not_yaml(tmp_path: Path):
    (tmp_path / "params.yaml").write_text("ppo: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")


def test_adaptive_kl_needs_a_nonzero_start():
    p = with_change("kl.target", 6.0)
    p["kl"]["coef"] = 0.0
    with pytest.raises(ParamsError, match=r"^kl\.coef: the adaptive controller"):
        parse_params(p)
    p["kl"]["coef"] = 0.05
    assert parse_params(p).kl.target == 6.0


def test_kl_coef_comes_from_the_state_only_with_the_controller():
    fixed = parse_params(BASE)
    assert fixed.kl_coef({"iteration": 3, "kl_coef": 0.7}) == BASE["kl"]["coef"]
    adaptive = parse_params(with_change("kl.target", 6.0))
    assert adaptive.kl_coef({"iteration": 3, "kl_coef": 0.7}) == 0.7
    assert adaptive.kl_coef({"iteration": 0}) == BASE["kl"]["coef"]  # a state from before the controller


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_iteration_past_a_decaying_schedule_is_a_params_error(schedule):
    p = with_change("optim.schedule", schedule)
    p["optim"]["total_iterations"] = 4
    params = parse_params(p)
    params.check_schedule_horizon(3)  # the last iteration with a nonzero learning rate
    for it in (4, 9):
        with pytest.raises(ParamsError) as err:
            params.check_schedule_horizon(it)
        assert str(err.value).startswith("optim.total_iterations:") and "\n" not in str(err.value)
    parse_params(with_change("optim.total_iterations", 4)).check_schedule_horizon(50)  # constant: no horizon


def past_horizon_project(tmp_path: Path, iteration: int) -> Path:
    p = with_change("optim.schedule", "cosine")
    p["optim"]["total_iterations"] = 3
    p["runtime"]["warm_start"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    state = tmp_path / p["paths"]["current"]
    state.mkdir(parents=True)
    (state / "state.json").write_text(f'{{"iteration": {iteration}, "global_step": 0, "seed": 42}}')
    return tmp_path


def test_update_stage_refuses_an_iteration_past_the_schedule_and_writes_nothing(tmp_path: Path):
    project = past_horizon_project(tmp_path, 3)
    before = set(project.rglob("*"))
    result = run(stage("update"), project, check=False)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "optim.total_iterations" in lines[0] and "iteration 3" in lines[0], result.stderr
    assert set(project.rglob("*")) == before


def test_train_refuses_up_front_when_its_last_iteration_is_past_the_schedule(tmp_path: Path):
    project = past_horizon_project(tmp_path, 1)  # iterations 1 and 2 fit a horizon of 3; a third would not
    before = set(project.rglob("*"))
    result = run(["rlhf", "train", "-n", "3"], project, check=False)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "optim.total_iterations" in lines[0] and "iteration 3" in lines[0], result.stderr
    assert set(project.rglob("*")) == before  # no dvc repro, no init


def test_embedded_preset_is_the_shipped_params(tmp_path: Path):
    """`rlhf preset embedded` goes back to exactly the shipped defaults (and qwen3-skywork → embedded round-trips)."""
    import shutil

    from rlhf.config.presets import apply

    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    apply("qwen3-skywork", tmp_path / "params.yaml")
    big = load_params(tmp_path / "params.yaml")
    assert big.policy_model.id == "Qwen/Qwen3-0.6B" and big.ppo.epochs == 4
    apply("embedded", tmp_path / "params.yaml")
    assert load_params(tmp_path / "params.yaml") == load_params(ROOT / "params.yaml")


def test_params_not_utf8_stop_every_entry_point_with_one_line_naming_the_line(tmp_path: Path):
    """A params.yaml saved in a legacy encoding (one Latin-1 byte in a comment) was a 59-line UnicodeDecodeError."""
    path = edited(tmp_path, "optim:\n", "optim:                         # reglages\n")
    path.write_bytes(path.read_bytes().replace(b"# reglages", b"# r\xe9glages"))  # the file's other lines stay UTF-8
    rows = path.read_bytes().split(b"\n")
    line = next(i for i, row in enumerate(rows, 1) if row.startswith(b"optim:"))
    expected = f"error: params.yaml: not valid UTF-8 (byte 0xe9 on line {line}); save the file as UTF-8"
    stages = [name[:-3] for name in sorted(p.name for p in (ROOT / "stages").glob("*.py"))]
    for cmd in [stage(name) for name in stages] + [["rlhf", "check-params"], ["rlhf", "train"]]:
        result = run(cmd, tmp_path, check=False)
        assert (result.returncode, result.stderr.strip().splitlines()) == (2, [expected]), (cmd, result.stderr)
