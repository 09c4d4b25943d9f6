"""What a first GPU run depends on, checked on the CPU: one GPU per local rank, `init` against the base models and
in a child process for its evaluation, the warm process never initialising CUDA, local base models linked not
copied, and gradients all-reduced in buckets (as one process computes them, with few collectives)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, run, stage, tiny_params
from rlhf.config.params import ParamsError
from rlhf.runtime.device import cuda_index


def test_a_local_rank_without_its_own_gpu_is_refused_in_one_line():
    assert cuda_index(0, 1) == 0 and cuda_index(1, 2) == 1
    with pytest.raises(ParamsError) as err:
        cuda_index(1, 1)
    message = str(err.value)
    assert "\n" not in message and "local rank 1" in message and "1 GPU" in message
    assert "--nproc-per-node" in message


@pytest.fixture(scope="module")
def based(tmp_path_factory, tiny_policy, tiny_reward):
    """A project folder with its base models and prepared prompts, nothing else."""
    d = tmp_path_factory.mktemp("based")
    (d / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_policy, tiny_reward, runtime={"threads": 1}),
                                                  sort_keys=False))
    (d / "data").mkdir()
    shutil.copytree(ROOT / "data/tldr", d / "data/tldr")
    for cmd in (stage("base_model", "policy"), stage("base_model", "reward"), stage("prepare")):
        run(cmd, d)
    return d


def test_base_model_of_a_local_folder_is_linked_not_copied(based, tiny_policy):
    weights = "model.safetensors"
    assert os.stat(based / "models/base/policy" / weights).st_ino == os.stat(tiny_policy / weights).st_ino


def test_init_refuses_a_base_that_is_not_the_params_model(based, tmp_path):
    d = tmp_path / "p"
    shutil.copytree(based, d, symlinks=True)
    p = yaml.safe_load((d / "params.yaml").read_text())
    built = p["policy_model"]["id"]
    p["policy_model"]["id"] = "Qwen/Qwen3-0.6B"
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = run(["rlhf", "init", "--no-baseline", "--no-track"], d, check=False)
    assert out.returncode == 2 and not (d / "models/current").exists()
    line = out.stderr.strip()
    assert "\n" not in line and built in line and "Qwen/Qwen3-0.6B" in line and "dvc repro policy_model" in line
    shutil.rmtree(d / "models/base/policy")  # a fresh clone: no base at all
    out = run(["rlhf", "init", "--no-baseline", "--no-track"], d, check=False)
    assert out.returncode == 2 and "run `dvc repro policy_model` first" in out.stderr


def test_init_evaluates_iteration_0_in_a_process_of_its_own(based, tmp_path):
    """`rlhf train` goes on to `dvc repro` in the process that ran init: the models of the baseline evaluation must
    not have lived there (their device memory and the CUDA context would stay held)."""
    d = tmp_path / "p"
    shutil.copytree(based, d, symlinks=True)
    code = ("import sys; from rlhf.config.params import load_params; from rlhf.project import init; "
            "init(load_params('params.yaml'), track=False); "
            "print(sorted(m for m in ('rlhf.evaluation', 'rlhf.models.scorers') if m in sys.modules))")
    out = run([sys.executable, "-c", code], d)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert json.loads((d / "metrics/eval_initial.json").read_text())["eval/reward_mean"] is not None


def test_the_warm_process_leaves_cuda_to_its_workers():
    """A CUDA initialisation in the warm process would break every forked stage on a GPU: its availability check
    must go through NVML there."""
    from rlhf.runtime import warm_start

    with warm_start._connect_or_start(warm_start.code_digest()):
        pass
    pids = [pid for pid, sock in warm_start.running() if sock.stem == warm_start.key()]
    assert pids
    environ = dict(kv.split("=", 1) for kv in open(f"/proc/{pids[0]}/environ").read().split("\0") if "=" in kv)
    assert environ.get(warm_start.NVML_CHECK_ENV) == "1"


ALL_REDUCE = """
import atexit, json, sys, torch, torch.distributed as td
from rlhf.runtime.device import resolve_device
from rlhf.runtime.distributed import init_distributed

out = sys.argv[1]
calls = []
real = td.all_reduce
td.all_reduce = lambda t, *a, **k: (calls.append(t.numel()), real(t, *a, **k))[1]
# Registered first, so it runs last at exit: is the process group still there when the interpreter ends?
atexit.register(lambda: open(f"{out}.exit{dist.rank}", "w").write(str(td.is_initialized())))
dist = init_distributed(resolve_device("cpu", "float32"))
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(40)])  # 80 parameters
data = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(1))
for micro in range(2):  # one process: both micro-batches; two ranks: one each
    if micro % dist.world == dist.rank:
        model(data[micro]).pow(2).sum().backward()
dist.sum_gradients(model.parameters())
if dist.is_main:
    torch.save({n: p.grad for n, p in model.named_parameters()}, out)
    json.dump({"calls": len(calls)}, open(out + ".json", "w"))
"""


def test_gradients_are_summed_in_buckets_as_one_process_computes_them(tmp_path):
    script = tmp_path / "sum.py"
    script.write_text(ALL_REDUCE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, str(script), str(one)], env=env, check=True)
    subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", str(script), str(two)], env=env, check=True)
    a, b = torch.load(one), torch.load(two)
    assert a.keys() == b.keys() and len(a) == 80
    for name in a:  # a + b is the same float sum in either order: byte for byte
        assert torch.equal(a[name], b[name]), name
    assert json.loads((tmp_path / "two.pt.json").read_text())["calls"] == 1  # one bucket, not 80 collectives
    # A rank that ends with its gloo group alive dies by SIGABRT in about one exit in five: it must be gone.
    assert [(tmp_path / f"two.pt.exit{r}").read_text() for r in range(2)] == ["False", "False"]
