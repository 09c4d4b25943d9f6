"""Device-to-host reads in the hot loops, counted on the CPU. On a GPU each read (item, tolist, bool/float/int of a
tensor, numpy, cpu) waits until every queued kernel has run, so one per micro-batch or per decoded token keeps the
GPU idle between them. Here every such call is counted (a CPU run cannot tell a device tensor from a host one, so the
counts are upper bounds) and located by its caller: the update may read a fixed few per optimizer step, whatever the
number of micro-batches; decode one per 8 tokens."""

import collections
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from rlhf.models import sampling
from rlhf.models.checkpoint import load_actors
from rlhf.models.passes import left_pad, length_sorted_groups
from rlhf.runtime.distributed import Dist
from rlhf.training import ppo_update
from test_models import perturb_adapter, project, prompts_and_responses  # noqa: F401 (fixture)
from test_wiring import base_models, make_params, one_step_setup, project_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}
ROOT = str(Path(__file__).resolve().parent.parent / "rlhf")


class HostReads(TorchFunctionMode):
    """Counts the tensor reads that copy to the host, by the line of rlhf/ that made them."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            frame = sys._getframe(1)
            while frame and not frame.f_code.co_filename.startswith(ROOT):
                frame = frame.f_back
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}" if frame else "outside rlhf/"
            self.sites[f"{func.__name__} at {where}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def test_the_update_reads_back_a_fixed_few_values_per_optimizer_step(project_dir, tiny_policy, tiny_reward):
    """4 optimizer steps over 8 rows, in micro-batches of 4 rows (1 per minibatch) or of 1 (4 per minibatch): the
    same reads, at most 3 per step (the finite checks, the step's statistics, the gradient norms) plus the epoch's
    shuffled order."""
    params = make_params(tiny_policy, tiny_reward, ppo={"epochs": 2, "num_minibatches": 2},
                         rollout={"batch_size": 8, "micro_batch_size": 1})
    actors, df, _, named, opts = one_step_setup(params)
    lengths = [len(p) + len(r) for p, r in zip(df["prompt_ids"], df["response_ids"])]
    reads = {}
    for rows in (4, 1):
        df["micro_batch"] = length_sorted_groups(lengths, rows)
        groups = ppo_update.build_groups(df, actors.device.where)
        with HostReads() as reads[rows]:
            ppo_update.ppo_epochs(actors, groups, params, opts, named, 0, Dist(), kl_coef=params.kl.coef)
    print(f"\nupdate, 4 steps: {reads[4].total} reads with 1 micro-batch per step, {reads[1].total} with 4: "
          f"{dict(reads[1].sites)}")
    assert reads[1].sites == reads[4].sites
    assert reads[1].total <= 3 * 4 + 2


def decode_reads(project, max_new_tokens: int) -> HostReads:
    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, _ = prompts_and_responses(actors.tokenizer, n=3)
    ids, mask = left_pad(prompts, 0)
    model = actors.model.get_base_model()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), sampling.merged_policy(actors), HostReads() as reads:
        out = sampling.decode(sampling.CachedLM(model, ids.shape[1] + max_new_tokens), ids, mask, max_new_tokens,
                              [-1], 0, lambda logits: sampling.pick_tokens(logits, 0.7, 1.0, False, gen), len(ids))
    assert out.shape[1] == max_new_tokens  # no stop token: every step runs
    return reads


def test_decode_reads_back_once_per_check_not_per_token(project):
    short, long = decode_reads(project, 8), decode_reads(project, 40)
    per_token = (long.total - short.total) / 32
    print(f"\ndecode: {short.total} reads for 8 tokens, {long.total} for 40: {dict(long.sites)}")
    assert per_token <= 1 / 8  # "has every row stopped" once per 8 tokens (END_CHECK_EVERY), nothing per token
