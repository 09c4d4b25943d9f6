"""The optional SFT warm start: the examples it builds, its loss against a naive float64 loop, that training lowers
that loss, the stacked export adapter, and the whole stage in `rlhf train` on tiny models: the reference is then the
SFT policy (not the raw base), the state remembers its start, and a changed start is refused."""

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import copy_repo, make_project, numerics, run, tiny_params
from rlhf.config.params import load_params, parse_params
from rlhf.models.sources import load_causal_lm, load_tokenizer
from rlhf.runtime.device import resolve_device
from rlhf.training.sft import Example, build_examples, mean_nll, target_nll, train

SFT_ON = {"enabled": True, "examples": 8, "epochs": 3, "batch_size": 4, "micro_batch_size": 2, "lr": 1e-2,
          "max_grad_norm": 1.0}


pytestmark = pytest.mark.usefixtures("one_thread")


def frame(references: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"prompt_id": range(100, 100 + len(references)), "reference": references,
                         "prompt_ids": [[11 + i, 12, 13 + i] for i in range(len(references))]})


def test_examples_end_with_eos_skip_long_summaries_and_follow_the_seed(tiny_policy):
    tok = load_tokenizer(tiny_policy)
    eos = tok.eos_token_id
    refs = [" short one", " a much longer human summary " * 6, " two words", " three little words", " fourth"]
    examples, skipped = build_examples(frame(refs), tok, eos, max_tokens=8, limit=None, seed=1)
    assert skipped == 1 and len(examples) == 4
    assert {e.prompt_id for e in examples} == {100, 102, 103, 104}
    for e in examples:
        text = refs[e.prompt_id - 100]
        assert e.target_ids == tok(text.strip(), add_special_tokens=False)["input_ids"] + [eos]
        assert e.prompt_ids == [11 + e.prompt_id - 100, 12, 13 + e.prompt_id - 100]
    again, _ = build_examples(frame(refs), tok, eos, 8, None, seed=1)
    other, _ = build_examples(frame(refs), tok, eos, 8, None, seed=2)
    assert again == examples and [e.prompt_id for e in other] != [e.prompt_id for e in examples]
    limited, _ = build_examples(frame(refs), tok, eos, 8, limit=2, seed=1)
    assert limited == examples[:2]


def test_target_nll_matches_a_naive_float64_loop(tiny_policy):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_policy, "float32")
    device = resolve_device("cpu", "float32")
    examples = [Example(0, [5, 6, 7, 8, 9], [20, 21]), Example(1, [30, 31], [40, 41, 42, 43]),
                Example(2, [50], [60])]
    with torch.no_grad():
        got = float(target_nll(model, examples, device))
    want = 0.0
    with torch.no_grad():
        for e in examples:  # one unpadded sequence at a time, full logits, float64 log-softmax
            ids = torch.tensor([e.prompt_ids + e.target_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (L, V)
            for t, token in enumerate(e.target_ids):
                want -= float(logp[len(e.prompt_ids) - 1 + t, token])
    assert got == pytest.approx(want, rel=1e-5)


def test_training_lowers_the_nll_of_its_summaries_and_touches_only_the_adapter(tiny_policy):
    from peft import get_peft_model

    from rlhf.models.actors import lora_config, quiet_peft_wrap

    torch.manual_seed(0)
    tok = load_tokenizer(tiny_policy)
    examples, _ = build_examples(frame([" the cat sat on the mat", " my landlord kept the deposit",
                                        " should I move to another city", " we broke up after two years"]),
                                 tok, tok.eos_token_id, 16, None, 0)
    base = load_causal_lm(tiny_policy, "float32")
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    with quiet_peft_wrap():
        model = get_peft_model(base, lora_config(4, 8, 0.0, ["q_proj", "v_proj", "down_proj"]))
    device = resolve_device("cpu", "float32")
    cfg = parse_params(tiny_params(tiny_policy, tiny_policy, sft={**SFT_ON, "epochs": 6})).sft
    lm = model.get_base_model()
    before = mean_nll(lm, examples, device, 2)
    history = train(lm, [p for p in model.parameters() if p.requires_grad], examples, cfg, device, 0, "off")
    after = mean_nll(lm, examples, device, 2)
    assert len(history) == 6 and all(h["tokens"] == sum(len(e.target_ids) for e in examples) for h in history)
    assert after < before - 0.3, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    for name, param in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_sft(tiny_policy, poison):
    from peft import get_peft_model

    from rlhf.models.actors import lora_config, quiet_peft_wrap

    tok = load_tokenizer(tiny_policy)
    examples, _ = build_examples(frame([" the cat sat on the mat", " my landlord kept the deposit"]), tok,
                                 tok.eos_token_id, 16, None, 0)
    with quiet_peft_wrap():
        # down_proj: its output joins the residual stream directly (torch's CPU SDPA turns NaN queries into finite
        # outputs, so a NaN in a q_proj adapter may never reach the loss)
        model = get_peft_model(load_causal_lm(tiny_policy, "float32"), lora_config(4, 8, 0.0, ["down_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if poison == "loss":
        trainable[0].data.fill_(float("nan"))
    else:  # a finite loss whose gradient is not
        trainable[0].register_hook(lambda grad: torch.full_like(grad, float("inf")))
    cfg = parse_params(tiny_params(tiny_policy, tiny_policy, sft=SFT_ON)).sft
    with pytest.raises(FloatingPointError, match=f"sft: non-finite {poison} at step 0; nothing written"):
        train(model.get_base_model(), trainable, examples, cfg, resolve_device("cpu", "float32"), 0, "off")


def test_stacked_adapter_equals_the_two_applied_in_turn(tiny_policy, tmp_path):
    from peft import PeftModel, get_peft_model

    from rlhf.models.actors import lora_config, quiet_peft_wrap
    from rlhf.models.start import stacked_adapter

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, (r, alpha), seed in (("first", (4, 8), 1), ("second", (2, 6), 2)):
        torch.manual_seed(seed)
        with quiet_peft_wrap():
            model = get_peft_model(load_causal_lm(tiny_policy, "float32"), lora_config(r, alpha, 0.0, targets))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)  # B = 0 would make every adapter the identity
        model.save_pretrained(tmp_path / name)
    stacked_adapter(tmp_path / "first", tmp_path / "second", tmp_path / "stacked")
    config = json.loads((tmp_path / "stacked" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6
    ids = torch.tensor([[9707, 1879, 11, 1879, 13, 400, 12]])
    with torch.no_grad(), quiet_peft_wrap():
        first = PeftModel.from_pretrained(load_causal_lm(tiny_policy, "float32"), tmp_path / "first").merge_and_unload()
        in_turn = PeftModel.from_pretrained(first, tmp_path / "second")(input_ids=ids).logits
        stacked = PeftModel.from_pretrained(load_causal_lm(tiny_policy, "float32"), tmp_path / "stacked")(input_ids=ids).logits
        base = load_causal_lm(tiny_policy, "float32")(input_ids=ids).logits
    assert (in_turn - base).abs().max() > 1e-2  # the adapters do something
    assert (in_turn - stacked).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------- the stage in a run


@pytest.fixture(scope="module")
def sft_repo(tmp_path_factory, tiny_policy, tiny_reward) -> Path:
    """`rlhf train --iterations 1` with the warm start on (summaries up to 40 tokens: the tiny params' 5 would skip
    every human TL;DR)."""
    p = tiny_params(tiny_policy, tiny_reward, sft=SFT_ON, rollout={"max_new_tokens": 40})
    repo = make_project(tmp_path_factory.mktemp("sft") / "repo", p)
    run(["rlhf", "train", "--iterations", "1"], repo)
    return repo


def in_repo(repo: Path):
    class _Cwd:
        def __enter__(self):
            self.before = os.getcwd()
            os.chdir(repo)
            return load_params(repo / "params.yaml")

        def __exit__(self, *exc):
            os.chdir(self.before)

    return _Cwd()


def test_sft_stage_trains_on_training_prompts_and_lowers_the_held_out_nll(sft_repo):
    metrics = json.loads((sft_repo / "metrics/sft.json").read_text())
    record = json.loads((sft_repo / "models/sft/sft.json").read_text())
    assert metrics["enabled"] and metrics["examples"] == 8 and metrics["steps"] == 6  # 3 epochs × 8 / 4
    assert metrics["heldout_prompts"] + metrics["heldout_skipped_long_summaries"] == 4
    assert metrics["heldout_nll_after"] < metrics["heldout_nll_before"], metrics  # unseen summaries
    assert metrics["train_loss_last_step"] < metrics["train_loss_first_step"]
    assert (sft_repo / "models/sft/adapter_model.safetensors").exists() and record["steps"] == 6
    train_ids = set(pd.read_parquet(sft_repo / "data/prepared/train.parquet")["prompt_id"])
    eval_ids = set(pd.read_parquet(sft_repo / "data/prepared/eval.parquet")["prompt_id"])
    assert len(record["prompt_ids"]) == 8 and set(record["prompt_ids"]) <= train_ids  # never a held-out post
    assert not set(record["prompt_ids"]) & eval_ids
    curve = (sft_repo / "metrics/sft_loss.tsv").read_text().splitlines()
    assert curve[0] == "step\tloss\tgrad_norm" and len(curve) == 7
    state = json.loads((sft_repo / "models/current/state.json").read_text())
    assert state["iteration"] == 1 and state["sft"] == record["adapter_sha256"]
    update = json.loads((sft_repo / "metrics/update.json").read_text())
    rollout = json.loads((sft_repo / "metrics/rollout.json").read_text())
    assert numerics(rollout) == numerics(update) and update["numerics/threads"] >= 1  # both passes alike
    assert update["first_minibatch/ratio_max_abs_dev"] == 0.0
    initial = json.loads((sft_repo / "metrics/eval_initial.json").read_text())
    assert abs(initial["eval/kl_mean"]) < 1e-6  # iteration 0 is the SFT policy = the reference


def test_the_reference_is_the_sft_policy_not_the_base(sft_repo):
    from rlhf.models.checkpoint import load_actors
    from rlhf.models.passes import reference_lm
    from rlhf.models.start import load_policy_start

    ids = torch.tensor([[9707, 1879, 11, 1879, 13, 400, 12]])
    with in_repo(sft_repo) as params, torch.no_grad():
        actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
        with reference_lm(actors) as lm:
            reference = lm(input_ids=ids).logits
        start = load_policy_start(Path(params.paths.policy_model), Path(params.paths.sft), "float32")(input_ids=ids).logits
        base = load_causal_lm(Path(params.paths.policy_model), "float32")(input_ids=ids).logits
    assert torch.allclose(reference, start, atol=1e-5)
    assert (reference - base).abs().max() > 1e-2


def test_export_stacks_the_sft_and_ppo_adapters_for_the_plain_base(sft_repo, tmp_path):
    from rlhf.models.checkpoint import load_actors
    from rlhf.reports.export import max_logit_difference

    repo = copy_repo(sft_repo, tmp_path / "repo")
    run(["rlhf", "export", "--out", "models/export"], repo)
    params_raw = yaml.safe_load((repo / "params.yaml").read_text())
    config = json.loads((repo / "models/export/adapter/adapter_config.json").read_text())
    assert config["r"] == 2 * params_raw["lora"]["r"]
    assert "warm start: SFT on 8 human TL;DRs" in (repo / "models/export/adapter/README.md").read_text()
    ids = torch.tensor([[9707, 1879, 11, 1879, 13]])
    with in_repo(repo) as params, torch.no_grad():
        assert max_logit_difference(params, repo / "models/current", repo / "models/export", ids) < 1e-4
        actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
        policy = actors.model.get_base_model()(input_ids=ids).logits
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(repo / "models/export/merged", dtype=torch.float32)(input_ids=ids).logits
    assert (policy - merged).abs().max() < 1e-4


def test_a_changed_start_is_refused_until_init_force(sft_repo, tmp_path):
    repo = copy_repo(sft_repo, tmp_path / "repo")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["sft"]["lr"] = 5e-3
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    result = run(["dvc", "repro"], repo, check=False)
    assert result.returncode != 0
    assert "rlhf init --force" in result.stdout + result.stderr
    assert "now holds SFT adapter" in result.stdout + result.stderr


def test_sft_off_writes_only_its_record(trained_repo):
    assert json.loads((trained_repo / "models/sft/sft.json").read_text()) == {"enabled": False}
    assert sorted(p.name for p in (trained_repo / "models/sft").iterdir()) == ["sft.json"]
    assert json.loads((trained_repo / "metrics/sft.json").read_text()) == {"enabled": False}
    assert json.loads((trained_repo / "models/current/state.json").read_text())["sft"] is None


def test_sft_enabled_without_an_adapter_stops_init_and_keeps_the_state(trained_repo, tmp_path):
    repo = copy_repo(trained_repo, tmp_path / "repo")
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["sft"]["enabled"] = True  # models/sft still holds the "off" record: the sft stage has not run
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    state = (repo / "models/current/state.json").read_bytes()
    result = run(["rlhf", "init", "--force"], repo, check=False)
    assert result.returncode == 2
    assert "sft.enabled, but models/sft holds no SFT adapter: run `dvc repro sft` first" in result.stderr
    assert (repo / "models/current/state.json").read_bytes() == state
