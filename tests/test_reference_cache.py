"""The reference's cached prompt keys/values (rlhf/models/reference_cache.py): the same keys/values as a left-padded
prefill, the same KL whether they come from disk or were just computed, a new file whenever the reference or the
prompts change, and a bad folder refused by the params check."""

from pathlib import Path

import pytest
import torch

import rlhf.models.reference_cache as rc
from rlhf.models.checkpoint import load_actors
from rlhf.models.passes import exact_kl, pack, reference_lm
from rlhf.models.sampling import CachedLM, left_pad
from test_models import perturb_adapter, project, prompts_and_responses  # noqa: F401 (fixture)


def setup(project, n=5):
    actors = load_actors(project, Path("state"), trainable=False, with_critic=False)
    perturb_adapter(actors)
    prompts, responses = prompts_and_responses(actors.tokenizer, n=n)
    return actors, [p[: 12 + 9 * i] for i, p in enumerate(prompts)], responses


def test_prompt_keys_values_equal_a_left_padded_prefill(project):
    """Computed right-padded in length-sorted passes, placed right-aligned by batch(): what a left-padded prefill of
    the reference over the same prompts (minus their last token) holds at every real slot."""
    actors, prompts, _ = setup(project)
    kv = rc.compute_prompt_kv(actors, prompts, rows_per_pass=2)
    rows = [3, 0, 4]
    buffers, mask, P = kv.batch(rows, extra=2, where=torch.device("cpu"))
    ids, attn = left_pad([prompts[i][:-1] for i in rows], 0)
    assert torch.equal(mask, attn) and P == ids.shape[1]
    with torch.no_grad(), reference_lm(actors) as lm:
        lm_cache = CachedLM(lm, P)
        lm_cache.prefill(ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), rows_per_pass=len(rows))
    for (keys, values), layer in zip(buffers, lm_cache.cache.layers):
        assert keys.shape[2] == P + 2 and torch.count_nonzero(keys[..., P:, :]) == 0  # room for the responses
        real = attn.bool()[:, None, :, None].expand_as(layer.keys)
        torch.testing.assert_close(keys[..., :P, :][real], layer.keys[real], rtol=0, atol=1e-5)
        torch.testing.assert_close(values[..., :P, :][real], layer.values[real], rtol=0, atol=1e-5)
        assert torch.count_nonzero(keys[..., :P, :][~real]) == 0  # pad slots are zeros


def kls(kv, actors, prompts, responses, policy_logp):
    return rc.reference_kl(kv, list(range(len(prompts))), prompts, responses, policy_logp, actors, 0.7, 2)


def test_kl_on_cached_prompts_equals_the_packed_pass_and_the_file_changes_nothing(project, monkeypatch):
    actors, prompts, responses = setup(project)
    packed = pack(prompts, responses)
    with torch.no_grad(), actors.compute():
        from rlhf.models.passes import response_logits

        actors.use("policy")
        policy_logp = torch.log_softmax(response_logits(actors.model.get_base_model(), packed, 0.7), dim=-1)
        want = exact_kl(actors, packed, 0.7).sum(-1)  # (b,): the packed passes over prompt + response
    computed = rc.reference_prompt_kv(actors, prompts, 2, "cache")
    files = list(Path("cache").glob("*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(rc, "compute_prompt_kv", lambda *a: pytest.fail("the file was not used"))
    loaded = rc.reference_prompt_kv(actors, prompts, 2, "cache")
    got = kls(computed, actors, prompts, responses, policy_logp)
    assert kls(loaded, actors, prompts, responses, policy_logp) == got  # bit for bit
    assert float(want.min()) > 0
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5)


def test_a_new_reference_or_new_prompts_make_a_new_file(project, monkeypatch):
    actors, prompts, _ = setup(project)
    rc.reference_prompt_kv(actors, prompts, 2, "cache")
    first = {f.name for f in Path("cache").glob("*.safetensors")}
    computed = []
    real = rc.compute_prompt_kv
    monkeypatch.setattr(rc, "compute_prompt_kv", lambda *a: computed.append(1) or real(*a))
    rc.reference_prompt_kv(actors, prompts[:4], 2, "cache")  # other prompts
    assert computed == [1]
    perturb_adapter(actors, seed=1)  # the adapter is not the reference: same key
    rc.reference_prompt_kv(actors, prompts[:4], 2, "cache")
    assert computed == [1]
    with torch.no_grad():  # the reference itself changes
        actors.model.get_base_model().get_decoder().layers[0].mlp.down_proj.base_layer.weight[0, 0] += 1e-3
    kv = rc.reference_prompt_kv(actors, prompts[:4], 2, "cache")
    assert computed == [1, 1]
    names = {f.name for f in Path("cache").glob("*.safetensors")}
    assert len(names) == 1 and not names & first  # one file kept, the latest
    assert len(kv.offsets) == 5


def test_a_file_with_another_key_or_unreadable_is_not_used(project):
    actors, prompts, _ = setup(project, n=3)
    kv = rc.compute_prompt_kv(actors, prompts, 2)
    key = rc.cache_key(actors, prompts, 2)
    path = Path("cache") / f"reference-kv-{key}.safetensors"
    rc.save(kv, path, "another key")
    assert rc.load(path, key, torch.device("cpu")) is None
    assert rc.load(path, "another key", torch.device("cpu")) is not None
    path.write_bytes(b"\x00" * 100)  # a truncated or corrupt file is a miss, then overwritten
    assert rc.load(path, key, torch.device("cpu")) is None
    kv2 = rc.reference_prompt_kv(actors, prompts, 2, "cache")
    assert rc.load(path, key, torch.device("cpu")).offsets == kv2.offsets == kv.offsets


@pytest.mark.parametrize("folder", ["/tmp/cache", "../cache", ""])
def test_reference_cache_outside_the_project_is_refused(tiny_policy, tiny_reward, folder):
    from conftest import tiny_params
    from rlhf.config.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match="eval.reference_cache"):
        parse_params(tiny_params(tiny_policy, tiny_reward, eval={"reference_cache": folder}))


WRITER = """
import sys
from pathlib import Path

import torch

import rlhf.models.reference_cache as rc


def prompt_kv():
    g = torch.Generator().manual_seed(0)
    return rc.PromptKV([0, 3000, 6000], *[[torch.randn((6000, 2, 64), generator=g) for _ in range(2)] for _ in range(2)])


if __name__ == "__main__":
    kv = prompt_kv()
    Path(sys.argv[3]).touch()  # ready: imports done
    while not Path(sys.argv[4]).exists():  # both writers start writing together
        pass
    for _ in range(int(sys.argv[2])):
        rc.save(kv, Path(sys.argv[1]), "key")
"""


def test_two_writers_of_one_key_never_let_a_reader_see_a_partial_file(tmp_path):
    """Two processes write the same key's file over and over while this one reads it: every read is the whole file
    (both write the same bytes), and both writers finish without an error."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    reference = tmp_path / "reference" / f"reference-kv-key{rc.SUFFIX}"
    namespace: dict = {}
    exec(WRITER, namespace)
    rc.save(namespace["prompt_kv"](), reference, "key")
    whole = reference.read_bytes()
    path = tmp_path / "cache" / f"reference-kv-key{rc.SUFFIX}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    go = tmp_path / "go"
    writers = [subprocess.Popen([sys.executable, str(script), str(path), "40", str(tmp_path / f"ready{i}"), str(go)],
                                env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert all(w.poll() is None for w in writers), [w.stderr.read() for w in writers]
        time.sleep(0.01)
    go.touch()
    reads = torn = 0
    while any(w.poll() is None for w in writers):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # before the first publish
            continue
        reads += 1
        torn += data != whole
    errors = [w.stderr.read() for w in writers]
    assert reads > 20 and torn == 0, f"{torn} of {reads} reads saw a partial file"
    assert [w.returncode for w in writers] == [0, 0], errors
    assert path.read_bytes() == whole and not list(path.parent.glob("*.tmp"))
