"""Two processes on gloo (torchrun) compute exactly what one process computes: same merged artifacts, same update."""

import json
import shutil

import pytest
import yaml

from conftest import ROOT, run, stage, tiny_params


def torchrun(name: str, cwd):
    return run(["torchrun", "--standalone", "--nproc-per-node", "2", *stage(name)[1:]], cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_policy, tiny_reward):
    d = tmp_path_factory.mktemp("ddp")
    # One thread per process in both runs, as torchrun gives each worker: BLAS results may depend on the thread
    # count (different blocking), which is a property of the kernels, not of how the work is sharded.
    p = tiny_params(tiny_policy, tiny_reward, rollout={"batch_size": 8, "micro_batch_size": 2, "generation_chunk": 4},
                    ppo={"epochs": 2, "num_minibatches": 2}, runtime={"threads": 1})
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    (d / "data").mkdir()
    shutil.copytree(ROOT / "data/tldr", d / "data/tldr")
    for cmd in (stage("base_model", "policy"), stage("base_model", "reward"), stage("prepare"),
                ["rlhf", "init", "--no-baseline", "--no-track"], stage("sample")):
        run(cmd, d)
    return d


def test_sharded_stages_write_identical_artifacts_and_update(workdir):
    it = workdir / "data/iteration"
    single = {}
    for name, artifact in (("rollout", "rollout.parquet"), ("reward", "scores.parquet"),
                           ("reference", "reference.parquet")):
        run(stage(name), workdir)
        single[artifact] = (it / artifact).read_bytes()
        torchrun(name, workdir)
        assert (it / artifact).read_bytes() == single[artifact], f"{name}: 2-process artifact differs"
    run(stage("advantages"), workdir)

    run(stage("update"), workdir)
    one = json.loads((workdir / "metrics/update.json").read_text())
    shutil.copytree(workdir / "models/next", workdir / "next-single")
    torchrun("update", workdir)
    two = json.loads((workdir / "metrics/update.json").read_text())

    from safetensors.torch import load_file

    for sub in ("policy/adapter_model.safetensors", "critic/adapter_model.safetensors",
                "critic/value_head.safetensors", "optimizer/policy.safetensors"):
        a, b = load_file(str(workdir / "next-single" / sub)), load_file(str(workdir / "models/next" / sub))
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max().item() <= 1e-5 * max(1.0, a[k].abs().max().item()), (sub, k)
    for key in ("loss/policy", "loss/value", "policy/approxkl", "grad_norm/policy", "grad_norm/critic"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
    assert two["first_minibatch/ratio_max_abs_dev"] <= 1e-5
