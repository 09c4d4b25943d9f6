"""Fast CLI checks that need no trained state."""

import yaml

from conftest import ROOT, run, stage


def test_report_prints_the_true_lora_count():
    out = run(["rlhf", "report"], ROOT).stdout
    assert "20,185,088 trainable" in out  # Qwen3-0.6B, r=32 on the 7 projections
    assert "Skywork" in out and "| **total (one process)** |" in out


def test_hub_unreachable_fails_fast_with_one_line(tmp_path):
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["policy_model"]["id"] = "Qwen/Qwen3-0.6B"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    result = run(stage("base_model", "policy"), tmp_path, check=False)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "'Qwen/Qwen3-0.6B'" in lines[0], result.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("*.safetensors"))


def test_qwen3_skywork_preset_is_one_switch_and_fails_fast_offline(tmp_path):
    import shutil

    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")
    run(["rlhf", "preset", "qwen3-skywork", "--policy-revision", "main"], tmp_path)
    text = (tmp_path / "params.yaml").read_text()
    assert "Qwen/Qwen3-0.6B" in text and "Skywork/Skywork-Reward-V2-Qwen3-8B" in text
    assert "# LoRA rank" in text  # comments survive
    p = yaml.safe_load(text)
    assert p["policy_model"]["prompt_format"] == "chat" and p["reward_model"]["kind"] == "classifier"
    assert p["data"]["source"] == "trl-lib/tldr" and p["lora"]["r"] == 32 and p["policy_model"]["revision"] == "main"
    result = run(stage("base_model", "reward"), tmp_path, check=False)
    assert result.returncode == 2 and "'Skywork/Skywork-Reward-V2-Qwen3-8B'" in result.stderr
    run(["rlhf", "preset", "embedded"], tmp_path)
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["policy_model"]["id"].startswith("embedded:")


def test_docs_tables_are_the_generated_ones(tmp_path):
    """docs/params.md holds `rlhf params-doc` of params.yaml; docs/gpu.md holds `rlhf report` of the params the
    qwen3-skywork preset makes (its micro-batch, token budget and epochs, not the embedded default's)."""
    import shutil

    docs = ROOT / "docs"
    params_md = (docs / "params.md").read_text()
    assert params_md.count(run(["rlhf", "params-doc"], ROOT).stdout.strip()) == 1  # present, and not pasted twice
    assert params_md.count("Also checked:") == 1
    preset = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", preset)
    run(["rlhf", "preset", "qwen3-skywork", "-p", str(preset)], tmp_path)
    report = run(["rlhf", "report", "-p", str(preset)], ROOT).stdout.strip()
    assert (docs / "gpu.md").read_text().count(report) == 1
