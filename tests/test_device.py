"""The device decision (rlhf/runtime/device.py), the meta-device guard against tensors created on the wrong device,
optimizer state across an iteration boundary, and critic.mode full end to end."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, numerics, run, stage, tiny_params
from rlhf import ppo
from rlhf.config.params import ParamsError, parse_params
from rlhf.models.checkpoint import OPTIMIZER_DIR, init_state, load_actors, load_optimizer, save_state
from rlhf.models.passes import critic_values, pack, policy_logprobs, reference_logprobs
from rlhf.models.sources import make_model_available
from rlhf.runtime import device as device_module
from rlhf.runtime.device import Device, resolve_device
from rlhf.training import ppo_update
from rlhf.training.ppo_update import build_groups, make_optimizer, minibatch_losses, trainable_parameters


def project_params(tmp_path, monkeypatch, tiny_policy, tiny_reward, **sections):
    monkeypatch.chdir(tmp_path)
    params = parse_params(tiny_params(tiny_policy, tiny_reward, **sections))
    make_model_available(params.policy_model.id, None, Path(params.paths.policy_model), "policy")
    init_state(params, Path("state"))
    return params


# --------------------------------------------------------------------------------------------- the decision


def test_resolve_device_cpu_and_meta_and_their_contexts():
    auto = resolve_device("auto", "bfloat16")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = resolve_device("cpu", "bfloat16")
    with cpu.compute():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with resolve_device("cpu", "float32").compute():
        assert not torch.is_autocast_enabled("cpu")
    assert cpu.attention("auto") == "chunked" and cpu.attention("eager") == "eager"
    assert cpu.backend == "gloo" and cpu.fused_optimizer
    gen = cpu.generator(7)
    assert gen.device.type == "cpu" and torch.equal(torch.rand(3, generator=gen),
                                                    torch.rand(3, generator=torch.Generator().manual_seed(7)))
    meta = resolve_device("meta", "bfloat16")
    assert meta.generator(7) is None and not meta.fused_optimizer
    with meta.compute():
        assert not torch.is_autocast_enabled("cpu")


def test_cuda_decisions_without_a_gpu():
    """What a CUDA device decides, checked on the object (no GPU needed)."""
    cuda = Device(torch.device("cuda", 1), torch.bfloat16)
    assert cuda.attention("auto") == "sdpa" and cuda.backend == "nccl" and cuda.fused_optimizer and cuda.is_cuda


def test_every_cuda_pass_holds_one_sdpa_kernel():
    """The rollout's no-grad pass and the update's grad pass both run inside Device.compute(): on CUDA it allows
    one SDPA kernel only (torch's own choice could differ between them), in fp32 as in bf16; the CPU is left alone.
    The flags are torch's global SDPA switches, so no GPU is needed to read them."""
    from torch.backends import cuda as sdp

    def enabled():
        return {"flash": sdp.flash_sdp_enabled(), "efficient": sdp.mem_efficient_sdp_enabled(),
                "math": sdp.math_sdp_enabled(), "cudnn": sdp.cudnn_sdp_enabled()}

    before = enabled()
    for dtype in (None, torch.bfloat16):
        with Device(torch.device("cuda", 0), dtype).compute():
            assert enabled() == {k: k == device_module.SDPA_BACKEND for k in before}
        assert enabled() == before
    with resolve_device("cpu", "float32").compute():
        assert enabled() == before
    assert device_module.SDPA_BACKEND in device_module.USED["sdpa_backend"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_params_error():
    with pytest.raises(ParamsError, match=r"^runtime.device: cuda, but torch sees no CUDA device"):
        resolve_device("cuda", "float32")


def test_runtime_device_and_auto_attention_are_validated():
    base = tiny_params(Path("p"), Path("r"))
    assert base["runtime"]["device"] == "auto" and base["policy_model"]["attention"] == "auto"
    with pytest.raises(ParamsError, match=r"^runtime.device: "):
        parse_params(tiny_params(Path("p"), Path("r"), runtime={"device": "gpu"}))
    with pytest.raises(ParamsError, match=r"^reward_model.attention: "):
        parse_params(tiny_params(Path("p"), Path("r"), reward_model={"attention": "flash"}))


def test_presets_default_to_auto_attention():
    from rlhf.config.presets import PRESETS

    for preset in PRESETS.values():
        assert preset["policy_model"]["attention"] == "auto" and preset["reward_model"]["attention"] == "auto"


def test_no_device_or_autocast_literal_outside_the_device_module():
    """The acceptance rule: one device decision. Model, training and stage code never names a device type."""
    pattern = re.compile(r"""["'](cpu|cuda|meta)(:\d+)?["']|torch\.autocast\(|\.cuda\(|torch\.cuda\.""")
    offenders = []
    for path in [*(ROOT / "rlhf").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        if path.name == "device.py" or path.parent.name in ("config", "reports"):  # the params' choices; reports
            continue  # count parameters on meta without running a stage
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


# --------------------------------------------------------------------------------------------- the meta guard


def meta_update_inputs(params, monkeypatch):
    """The update's inputs on the meta device: actors loaded with runtime.device meta, micro-batches packed there.
    transformers reads the position ids to detect packed sequences (a host sync meta cannot answer); for our rows
    (one sequence each) it finds none, so that answer is given directly."""
    import pandas as pd
    from transformers import masking_utils

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)

    actors = load_actors(params, Path("state"), trainable=True)
    assert actors.device.type == "meta"
    assert {p.device.type for p in actors.model.parameters()} == {"meta"}
    prompts = [[11, 12, 13, 14], [21, 22], [31, 32, 33], [41]]
    responses = [[5, 6, 7], [8, 9], [10], [12, 13, 14, 15]]
    rows = {"prompt_ids": prompts, "response_ids": responses, "micro_batch": [0, 0, 1, 1]}
    for col in ("logprobs", "ref_logprobs", "values", "advantages", "returns"):
        rows[col] = [[0.1 * (i + 1)] * len(r) for i, r in enumerate(responses)]
    groups = build_groups(pd.DataFrame(rows), actors.device.where)
    assert groups[0].packed.input_ids.device.type == "meta" and groups[0].advantages.device.type == "meta"
    return actors, groups


@pytest.mark.parametrize("critic_mode", ["lora", "full"])
def test_meta_guard_drives_packing_forward_loss_and_optimizer_step(tmp_path, monkeypatch, tiny_policy, tiny_reward,
                                                                   critic_mode):
    """Every pass of the update on `runtime.device: meta` (shapes, no values). PyTorch refuses to mix a CPU tensor
    into elementwise ops, cat, where, masked_fill and matmul on meta, so a tensor created without the device in these
    paths fails here as it would on CUDA.

    What this guard misses: 0-d CPU tensors (CUDA accepts them too); an embedding lookup or gather/indexing with CPU
    indices into a meta tensor (meta accepts them, CUDA does not — packed ids made on the CPU would pass until
    they meet the CPU response mask); F.linear with a CPU input and a meta weight (returns a CPU tensor); the finite
    checks, host syncs (float(), .tolist(), bool()) and sampling (its stop test and the artifact boundary read
    values, which meta has none of), so minibatch_losses runs with check=False and sampling is not driven here;
    the collectives (one process); and bf16 autocast, which meta does not have (the base runs in fp32 here)."""
    params = project_params(tmp_path, monkeypatch, tiny_policy, tiny_reward, runtime={"device": "meta"},
                            critic={"mode": critic_mode})
    actors, groups = meta_update_inputs(params, monkeypatch)
    with torch.no_grad():
        assert reference_logprobs(actors, groups[0].packed, 0.7).device.type == "meta"
        assert critic_values(actors, groups[0].packed).device.type == "meta"
    named = trainable_parameters(actors)
    opts = [make_optimizer(n, 1e-3, params, actors.device) for n in named]
    n_tokens = float(sum(len(r) for r in [[5, 6, 7], [8, 9], [10], [12, 13, 14, 15]]))
    sums = minibatch_losses(actors, groups, params, "meta guard", n_tokens, check=False, kl_coef=params.kl.coef)
    assert all(torch.as_tensor(v).device.type in ("meta", "cpu") for v in sums.values())
    assert sums["loss/policy"].device.type == "meta"
    for opt, n in zip(opts, named):
        assert all(p.grad is not None and p.grad.device.type == "meta" for p in n.values())
        torch.nn.utils.clip_grad_norm_(list(n.values()), 1.0)
        opt.step()
        assert all(s["exp_avg"].device.type == "meta" for s in opt.state.values())


def test_meta_guard_catches_a_cpu_tensor_in_the_update(tmp_path, monkeypatch, tiny_policy, tiny_reward):
    """The guard can fail: one host tensor slipped into the policy loss's inputs is refused on meta."""
    params = project_params(tmp_path, monkeypatch, tiny_policy, tiny_reward, runtime={"device": "meta"})
    actors, groups = meta_update_inputs(params, monkeypatch)
    loss = ppo.clipped_policy_loss
    monkeypatch.setattr(ppo_update.ppo, "clipped_policy_loss",
                        lambda lp, old, adv, *rest: loss(lp, old, torch.zeros(adv.shape), *rest))
    with pytest.raises(RuntimeError, match="device"):
        minibatch_losses(actors, groups, params, "meta guard", 10.0, check=False, kl_coef=params.kl.coef)


def test_packed_tensors_are_created_on_the_device():
    p = pack([[5, 6, 7], [8]], [[1, 2], [3]], torch.device("meta"))
    assert {t.device.type for t in (p.input_ids, p.response_ids, p.response_mask, p.response_index)} == {"meta"}


# --------------------------------------------------------------------------------------------- optimizer state


def one_step(actors, named, opts, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    prompts = [[int(x) for x in torch.randint(100, 5000, (6,), generator=gen)] for _ in range(2)]
    packed = pack(prompts, [[7, 8, 9], [10, 11]], actors.device.where)
    lp, _ = policy_logprobs(actors, packed, 0.7)
    (lp.sum() + critic_values(actors, packed).pow(2).sum()).backward()
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("critic_mode", ["lora", "full"])
def test_optimizer_state_survives_an_iteration_boundary(tmp_path, monkeypatch, tiny_policy, tiny_reward, critic_mode):
    """Moments saved by name from opt.state_dict() come back through load_state_dict into the next iteration's fresh
    optimizer (new parameter objects), bit for bit, with the parameters' dtype and device; the restored optimizer
    takes the same next step as one that never went through the files."""
    params = project_params(tmp_path, monkeypatch, tiny_policy, tiny_reward, critic={"mode": critic_mode},
                            policy_model={"dtype": "bfloat16"})
    actors = load_actors(params, Path("state"), trainable=True)
    named = trainable_parameters(actors)
    if critic_mode == "full":  # fp32 master weights under bf16 autocast
        assert {p.dtype for n, p in named[1].items() if n.startswith("backbone.")} == {torch.float32}
    opts = [make_optimizer(n, 1e-3, params, actors.device) for n in named]
    one_step(actors, named, opts, 0)
    save_state(actors, opts, named, {"iteration": 0}, 1, Path("next"))
    one_step(actors, named, opts, 1)  # the run that never reloads

    again = load_actors(params, Path("next"), trainable=True)
    named2 = trainable_parameters(again)
    assert list(named2[1]) == list(named[1]) and list(named2[0]) == list(named[0])
    opts2 = [make_optimizer(n, 1e-3, params, again.device) for n in named2]
    for opt, n, file in zip(opts2, named2, ("policy", "critic")):
        load_optimizer(opt, n, Path("next") / OPTIMIZER_DIR / f"{file}.safetensors")
        state = opt.state_dict()["state"]
        assert len(state) == len(n)
        for i, p in enumerate(n.values()):
            assert state[i]["exp_avg"].dtype == p.dtype and state[i]["exp_avg"].device == p.device
            assert float(state[i]["step"]) == 1.0
    one_step(again, named2, opts2, 1)
    for a, b in zip(named, named2):
        for name in a:
            assert torch.equal(a[name].detach(), b[name].detach()), name


# --------------------------------------------------------------------------------------------- end to end


def test_critic_mode_full_end_to_end_on_a_bf16_base(tmp_path, tiny_policy, tiny_reward):
    """init → sample → rollout → reward → reference → advantages → update with a full critic on a bf16 base: the
    critic trains fp32 master weights under autocast, the first minibatch has ratio exactly 1, and the critic's
    moments are saved under the backbone's parameter names."""
    p = tiny_params(tiny_policy, tiny_reward, critic={"mode": "full"}, policy_model={"dtype": "bfloat16"},
                    runtime={"warm_start": False})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (tmp_path / "data").mkdir()
    import shutil

    shutil.copytree(ROOT / "data/tldr", tmp_path / "data/tldr")
    for cmd in (stage("base_model", "policy"), stage("base_model", "reward"), stage("prepare"),
                ["rlhf", "init", "--no-baseline", "--no-track"], stage("sample"), stage("rollout"), stage("reward"),
                stage("reference"), stage("advantages"), stage("update")):
        run(cmd, tmp_path)
    update = json.loads((tmp_path / "metrics/update.json").read_text())
    rollout = json.loads((tmp_path / "metrics/rollout.json").read_text())
    assert numerics(rollout) == numerics(update) and update["numerics/dtype"] == "bfloat16"
    assert update["first_minibatch/ratio_max_abs_dev"] == 0.0
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "models/current/critic/backbone/model.safetensors"))
    after = load_file(str(tmp_path / "models/next/critic/backbone/model.safetensors"))
    assert {t.dtype for t in after.values()} == {torch.float32}
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the critic really trained
    moments = load_file(str(tmp_path / "models/next/optimizer/critic.safetensors"))
    assert any(k.startswith("backbone.") and k.endswith("::exp_avg") for k in moments)


# --------------------------------------------------------------------------------------------- memory


def test_per_stage_peaks_for_the_qwen3_skywork_configuration():
    """Computed per-stage peaks: the reward stage holds the reward model alone, a full critic costs the update its
    fp32 copy with grads and moments, and the rendered table says where each stage fits."""
    from rlhf.config.presets import PRESETS
    from rlhf.reports.memory import GiB, count_reward, render_stages, stage_peaks

    raw = tiny_params(Path("p"), Path("r"))
    for section, values in PRESETS["qwen3-skywork"].items():
        raw[section].update(values)
    preset = parse_params(raw)
    configs = ROOT / "models/configs"
    peaks = {name: gib for name, gib, _ in stage_peaks(preset, configs)}
    reward_weights = count_reward(configs) * 2 / GiB
    assert reward_weights < peaks["reward"] < reward_weights + 3
    assert peaks["rollout"] < 8 and peaks["update"] < peaks["reward"]
    raw["critic"]["mode"] = "full"
    full = {name: gib for name, gib, _ in stage_peaks(parse_params(raw), configs)}
    assert full["update"] - peaks["update"] > 0.5e9 * 16 / GiB  # ≥ 0.5 B params × (weights, grads, 2 moments) fp32
    raw["critic"]["mode"] = "lora"
    raw["eval"]["max_new_tokens"] = 2000  # the KL's kept log-probs: 64 × 2000 × 151,936 fp32 ≈ 72 GiB, 4× the cache
    big = {name: gib for name, gib, _ in stage_peaks(parse_params(raw), configs)}
    assert big["evaluate"] > 64 * 2000 * 151936 * 4 / GiB > peaks["reward"] == peaks["evaluate"]
    raw["eval"]["max_new_tokens"] = 53
    raw["data"]["eval_size"] = 2000  # the reference's keys/values of 2000 prompts × 512 tokens, bf16: 109 GiB
    many = {name: gib for name, gib, _ in stage_peaks(parse_params(raw), configs)}
    assert many["evaluate"] > 2000 * 512 * 28 * 2 * 8 * 128 * 2 / GiB > peaks["evaluate"]
    table = render_stages(preset, configs)
    assert table.count("\n") == 6 and "| reward | " in table and "fits 24 GB" in table


NATIVE = frozenset({"sse2", "avx2", "avx512f", "avx512_bf16"})  # /proc/cpuinfo flags of an AVX512-BF16 CPU
EMULATED = frozenset({"sse2", "avx2", "avx512f"})  # AVX-512 without AVX512-BF16/AMX: oneDNN emulates bf16


def fake_cpu(monkeypatch, tmp_path, flags, rates, kernels=True):
    """The dtype decision's inputs faked: oneDNN's bf16 kernels, the CPU's flags, the measured (fp32, bf16) matmul
    GFLOP/s; the per-machine record in a file of the test's own. Returns the list of measurements taken."""
    from rlhf.runtime import device

    measured = []

    def measure():
        measured.append(rates)
        return rates

    monkeypatch.setenv("RLHF_DTYPE_CACHE", str(tmp_path / "cpu-dtype.json"))
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: kernels)
    monkeypatch.setattr(device, "cpu_flags", lambda: flags, raising=False)
    monkeypatch.setattr(device, "measure_bf16_fp32", measure, raising=False)
    monkeypatch.setattr(device, "matmul_gflops", lambda dtype, *a, **k: 100.0)  # the machine line's own rates
    return measured


@pytest.mark.parametrize("flags,rates,kernels,expected", [
    (NATIVE, (100.0, 400.0), True, "bfloat16"),  # native bf16, measured 4× faster
    (NATIVE, (300.0, 50.0), True, "float32"),  # flags promise bf16, the measurement says slower
    (EMULATED, (284.0, 49.7), True, "float32"),  # AVX-512 alone: oneDNN says bf16 is supported, and emulates it
    (NATIVE, (100.0, 400.0), False, "float32"),  # no oneDNN bf16 kernels at all (AVX2-only)
])
def test_auto_dtype_on_a_cpu_is_bf16_only_where_it_is_faster(monkeypatch, tmp_path, flags, rates, kernels, expected):
    """On an AVX-512 CPU without AVX512-BF16/AMX, oneDNN reports bf16 support and emulates it slower than fp32:
    `auto` once took bf16 there. The machine line says which dtype `auto` chose and why."""
    from rlhf.runtime.device import machine_line, resolve_dtype

    fake_cpu(monkeypatch, tmp_path, flags, rates, kernels)
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == "float32" and resolve_dtype("bfloat16", cpu) == "bfloat16"
    assert resolve_dtype("auto", cpu) == expected
    device = resolve_device("cpu", "auto")
    assert device.dtype == expected and (device.autocast_dtype is not None) == (expected == "bfloat16")
    line = machine_line("auto", "cpu")
    assert line.endswith(")") and f"; dtype {expected} (auto: " in line, line
    if (flags, kernels) == (NATIVE, True):  # the measurement decided, and the line gives it
        fp32, bf16 = rates
        assert (f"{bf16 / fp32:.1f}× fp32 measured" if bf16 > fp32 else f"{bf16:.0f} < fp32 {fp32:.0f}") in line
    assert "dtype float32 (set in params.yaml)" in machine_line("float32", "cpu")
    assert resolve_dtype("auto", torch.device("meta")) == "float32"


def test_auto_dtype_is_decided_once_per_machine(monkeypatch, tmp_path):
    """Every stage resolves `auto`; one run's stages must all get the same dtype, so the measurement is taken once and
    kept, and a later stage whose own measurement would say otherwise reads the kept decision."""
    from rlhf.runtime import device

    measured = fake_cpu(monkeypatch, tmp_path, NATIVE, (100.0, 400.0))
    assert device.resolve_dtype("auto", torch.device("cpu")) == "bfloat16" and len(measured) == 1
    fake_cpu(monkeypatch, tmp_path, NATIVE, (400.0, 100.0))  # a second measurement would flip it
    assert [device.resolve_dtype("auto", torch.device("cpu")) for _ in range(3)] == ["bfloat16"] * 3
    record = json.loads((tmp_path / "cpu-dtype.json").read_text())
    assert [(r["dtype"], r["fp32_gflops"], r["bf16_gflops"]) for r in record.values()] == [("bfloat16", 100.0, 400.0)]
    # Another torch is another machine as far as the kernels go: decided afresh, kept beside the first.
    measured = fake_cpu(monkeypatch, tmp_path, NATIVE, (400.0, 100.0))
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert device.resolve_dtype("auto", torch.device("cpu")) == "float32" and len(measured) == 1
    assert len(json.loads((tmp_path / "cpu-dtype.json").read_text())) == 2


def test_auto_dtype_without_a_writable_record_follows_the_flags_alone(monkeypatch, tmp_path):
    """A measurement that cannot be kept would be taken again by each stage and could differ: the flags decide."""
    from rlhf.runtime import device

    measured = fake_cpu(monkeypatch, tmp_path, NATIVE, (400.0, 100.0))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RLHF_DTYPE_CACHE", str(tmp_path / "file" / "cpu-dtype.json"))  # under a file: no folder
    choices = [device.explain_dtype("auto", torch.device("cpu")) for _ in range(2)]
    assert choices[0] == choices[1] and choices[0][0] == "bfloat16" and "cannot write" in choices[0][1]
    assert measured == []
    fake_cpu(monkeypatch, tmp_path, EMULATED, (100.0, 400.0))
    monkeypatch.setenv("RLHF_DTYPE_CACHE", str(tmp_path / "file" / "cpu-dtype.json"))
    assert device.resolve_dtype("auto", torch.device("cpu")) == "float32"


def test_auto_dtype_follows_onednn_isa_cap(monkeypatch, tmp_path):
    """ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16 makes oneDNN emulate bf16 on a CPU that has it: fp32, unmeasured."""
    from rlhf.runtime import device

    measured = fake_cpu(monkeypatch, tmp_path, NATIVE, (100.0, 400.0))
    for cap, expected in (("AVX512_CORE", "float32"), ("avx2", "float32"), ("AVX512_CORE_BF16", "bfloat16"),
                          ("AVX512_CORE_AMX", "bfloat16"), ("ALL", "bfloat16")):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        dtype, why = device.explain_dtype("auto", torch.device("cpu"))
        assert dtype == expected, (cap, why)
        assert (f"ONEDNN_MAX_CPU_ISA={cap}" in why) == (expected == "float32")
    assert len(measured) == 3  # each uncapped setting is a machine of its own; the capped ones need no measurement
