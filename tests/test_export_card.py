"""`rlhf export` writes a Hugging Face model card (README.md with YAML front matter) beside the adapter and the merged
model; its facts come from the files (the trainable count from the saved adapter tensors)."""

import json
import re

import pytest
import yaml
from safetensors.torch import load_file

from conftest import copy_repo, full_params, run
from rlhf.config.params import parse_params
from rlhf.reports import model_card


def split_card(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def exported(trained_repo, tmp_path_factory):
    repo = copy_repo(trained_repo, tmp_path_factory.mktemp("card") / "repo")
    result = run(["rlhf", "export", "--out", "models/export"], repo)
    return repo, result


def test_both_folders_carry_a_model_card(exported):
    repo, result = exported
    out = repo / "models" / "export"
    params = yaml.safe_load((repo / "params.yaml").read_text())
    state = json.loads((repo / "models/current/state.json").read_text())
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["iteration"] == state["iteration"]
    adapter_tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    trainable = sum(t.numel() for t in adapter_tensors.values())
    assert trainable > 0
    for kind, library in (("adapter", "peft"), ("merged", "transformers")):
        meta, body = split_card((out / kind / "README.md").read_text())
        assert meta["library_name"] == library and meta["pipeline_tag"] == "text-generation"
        assert {"rlhf", "ppo"} <= set(meta["tags"])
        # the tiny base is a local folder: no hub id to name, no licence to claim, no hub dataset
        assert "base_model" not in meta and "license" not in meta and "datasets" not in meta
        assert f"local folder `{params['policy_model']['id']}`" in body
        assert f"counted from `adapter_model.safetensors`): {trainable:,}" in body
        assert f"r: {params['lora']['r']}, lora_alpha: {float(params['lora']['alpha'])}" in body
        assert f"after PPO iteration {state['iteration']}" in body
        assert f"| eval/reward_mean | {metrics['eval/reward_mean']:.4g} |" in body
        sample_rows = [line for line in (repo / "metrics/samples.md").read_text().splitlines() if line.startswith("|")]
        shown, rest = sample_rows[:2 + model_card.SAMPLE_ROWS], sample_rows[2 + model_card.SAMPLE_ROWS:]
        assert len(shown) == 2 + model_card.SAMPLE_ROWS and rest  # header, rule, first rows; the tiny run has more
        assert all(row in body for row in shown) and not any(row in body for row in rest)
        ppo = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
        assert ppo == {k: params[k] for k in ("ppo", "kl", "gae", "optim")}
        assert "data/tldr/validation-1945.parquet" in body and "Intended use" in body
    assert "warn" not in result.stderr.lower() and "Loading weights" not in result.stderr


def test_card_of_the_default_setup_names_the_hub_base_dataset_and_the_similarity_caveat(exported, monkeypatch):
    repo, _ = exported
    monkeypatch.chdir(repo)
    raw = full_params(data={"source": "trl-lib/tldr", "split": "train"}, paths={"metrics": "metrics-none"})
    base_source = repo / "models/base/policy/source.json"
    base_source.write_text(json.dumps({"id": "embedded:smollm2-135m-instruct", "weights": "local"}))
    card = model_card.render(parse_params(raw), repo / "models/current", repo / "models/export/adapter", "adapter")
    meta, body = split_card(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["trl-lib/tldr"] and meta["base_model_relation"] == "adapter"
    assert "dequantised from the Q4_1 GGUF" in body
    assert "Not evaluated: no held-out metrics of iteration 1" in body
    assert "cosine similarity between MiniLM" in body and "not a preference model" in body


def test_a_hub_base_records_its_resolved_revision(exported, monkeypatch):
    repo, _ = exported
    monkeypatch.chdir(repo)
    (repo / "models/base/policy/source.json").write_text(json.dumps(
        {"id": "Qwen/Qwen3-0.6B", "revision": "main", "resolved_revision": "c1899de", "weights": "hub"}))
    meta, body = split_card(model_card.render(parse_params(full_params()), repo / "models/current",
                                              repo / "models/export/adapter", "merged"))
    assert meta["base_model"] == "Qwen/Qwen3-0.6B" and meta["base_model_relation"] == "finetune"
    assert "revision: c1899de" in body and "lora" not in meta["tags"]
