"""Two processes on gloo (torchrun) compute exactly what one process computes: same merged artifacts, same update."""

import json
import shutil

import pytest

from conftest import run, sharded_project, stage


def torchrun(name: str, cwd):
    return run(["torchrun", "--standalone", "--nproc-per-node", "2", *stage(name)[1:]], cwd)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_policy, tiny_reward):
    return sharded_project(tmp_path_factory.mktemp("ddp"), tiny_policy, tiny_reward)


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
