"""`rlhf params-doc`: the params reference, generated from the typed params (types, allowed values) and params.yaml
(values and, from its comments, descriptions)."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from rlhf.config.params import Params


def _constraint(field) -> str:
    parts = []
    for m in field.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(m, attr, None) is not None:
                parts.append(f"{sym} {getattr(m, attr)}")
    ann = field.annotation
    args = typing.get_args(ann)
    literals = [a for a in args if typing.get_origin(a) is typing.Literal] or ([ann] if typing.get_origin(ann) is typing.Literal else [])
    for lit in literals:
        parts.append(" \\| ".join(str(v) for v in typing.get_args(lit)))
    return ", ".join(parts)


# The validators of rlhf/config/params.py that no single row's type or bounds show.
ALSO_CHECKED = (
    "Also checked: `rollout.batch_size` divisible by `rollout.micro_batch_size × ppo.num_minibatches`; "
    "`sft.batch_size` divisible by `sft.micro_batch_size`; paths (and `eval.reference_cache`) relative and inside "
    "the project; floats finite; ids, paths and module lists non-empty; `policy_model.instruction` with `{post}` "
    "exactly once; `kl.estimator: k1` only with `kl.in_reward: true`; `kl.target` only with `kl.coef > 0`; "
    "`eval.samples_per_prompt: 1` when `eval.greedy`; the embedded MiniLM scorer only as `reward_model.kind: "
    "similarity`; a linear/cosine schedule's `optim.total_iterations` covering the iterations run (checked by "
    "`rlhf train` and the update stage); a `runtime.launcher` torchrun over several nodes with a meeting point "
    "(no `--standalone`; with `--rdzv-backend c10d`, `--rdzv-endpoint HOST:PORT` and `--rdzv-id`); every key "
    "present, unknown keys rejected."
)


def _type(ann) -> str:
    if typing.get_origin(ann) is typing.Annotated:  # constraints show in the "allowed" column, not here
        return _type(typing.get_args(ann)[0])
    if typing.get_origin(ann) is typing.Literal:
        return "choice"
    if typing.get_origin(ann) is tuple:  # a YAML list, kept immutable
        return "list of " + _type(typing.get_args(ann)[0])
    text = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return re.sub(r"Literal\[[^\]]*\]", "choice", text).replace(" | ", " or ")


def yaml_comments(path: Path) -> dict[str, str]:
    """key path → its comment, from an indented params.yaml: the trailing comment of the key's line (after its value,
    quoted values may hold '#') and the comment-only lines right below it that are indented deeper than the key."""
    out, stack, last, last_indent = {}, [], None, 0
    for line in path.read_text().splitlines():
        cont = re.match(r"^(\s+)#\s?(.*)$", line)
        if cont and last is not None and len(cont.group(1)) > last_indent:
            out[last] = f"{out.get(last, '')} {cont.group(2).strip()}".strip()
            continue
        m = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*)$", line)
        if not m:
            last = None
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        last, last_indent = ".".join(stack), len(m.group(1))
        rest = re.sub(r'"(?:[^"\\]|\\.)*"' + r"|'[^']*'", "", m.group(3))  # drop quoted values
        if "#" in rest:
            out[last] = rest.split("#", 1)[1].strip()
    return out


def render(params_file: Path) -> str:
    """One row per key; the value column is params.yaml's value (the file sets every key)."""
    from rlhf.config.params import load_params

    values = load_params(params_file)
    comments = yaml_comments(params_file)
    lines = ["| key | type | value | allowed | description |", "|---|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, current) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = field.annotation
            value = getattr(current, name)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, key + ".", value)
                continue
            shown = "null" if value is None else ", ".join(value) if isinstance(value, tuple) else value
            shown = str(shown).replace("\n", "\\n")  # one table row
            lines.append(f"| `{key}` | {_type(ann)} | `{shown}` | {_constraint(field)} | "
                         f"{comments.get(key, '').replace('|', '/')} |")

    walk(Params, "", values)
    return "\n".join(lines) + "\n\n" + ALSO_CHECKED + "\n"
