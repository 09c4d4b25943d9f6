"""Generation speed of two commits side by side, in one run on one machine: the sampler of each commit (its own
`rlhf` package, from a git worktree) on the same policy state and the same prompts, alternating commits per rep.

    .venv/bin/python bench/decode_speed.py --project /path/to/a/trained/repo --commits 27630fb HEAD

--project is a repo where `rlhf train` (or `rlhf init` after `dvc repro prepare policy_model`) has run: its
params.yaml, models/base/policy, models/current and data/prepared are used, never written. Two settings by default:
compare_trl.py's (16 prompts, chunks of 8) and the rollout's (32 prompts, one chunk); each prints the wall seconds
of generate() (prefill and decoding; model loading excluded), generated tokens/s, and whether both commits sampled
the same responses. The machine line (matmul GFLOP/s) is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside a worktree of one commit (its rlhf first on sys.path); prints one JSON line.
PROBE = r"""
import inspect, json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
os.chdir(sys.argv[2])
n, chunk, reps_seed = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
import pandas as pd, torch, yaml
from rlhf.config.params import Params, parse_params
from rlhf.models.checkpoint import load_actors
from rlhf.models import sampling

def known(model, raw):  # the project's params without keys this commit does not know (params added later)
    out = {}
    for key, value in raw.items():
        if key in model.model_fields:
            sub = model.model_fields[key].annotation
            out[key] = known(sub, value) if isinstance(value, dict) and hasattr(sub, "model_fields") else value
    return out

params = parse_params(known(Params, yaml.safe_load(open("params.yaml"))))
actors = load_actors(params, Path(params.paths.current), trainable=False, with_critic=False)
prompts = list(pd.read_parquet(Path(params.paths.prepared) / "train.parquet")["prompt_ids"])[:n]
kw = {}
if "rows_per_pass" in inspect.signature(sampling.generate).parameters:
    kw["rows_per_pass"] = params.rollout.micro_batch_size
start = time.perf_counter()
out = sampling.generate(actors, prompts, params.rollout.max_new_tokens, params.rollout.temperature,
                        params.rollout.top_p, seed=reps_seed, chunk_size=chunk, **kw)
seconds = time.perf_counter() - start
tokens = sum(len(r) for r in out)
print(json.dumps({"seconds": seconds, "tokens": tokens, "responses": out}))
"""


def worktree(commit: str, into: Path) -> Path:
    path = into / commit.replace("/", "_")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), commit], check=True,
                   capture_output=True)
    return path


def probe(tree: Path, project: Path, n: int, chunk: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(tree), str(project), str(n), str(chunk), str(seed)],
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "CI": "1",
                                                              "PATH": str(Path(sys.executable).parent)})
    if out.returncode != 0:
        raise SystemExit(f"{tree.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--project", type=Path, required=True)
    ap.add_argument("--commits", nargs=2, default=["HEAD~1", "HEAD"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=["16x8", "32x32"], help="PROMPTSxCHUNK")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from rlhf.runtime.device import machine_line

    with tempfile.TemporaryDirectory() as tmp:
        trees = {c: worktree(c, Path(tmp)) for c in args.commits}
        try:
            for setting in args.settings:
                n, chunk = (int(x) for x in setting.split("x"))
                runs: dict[str, list[dict]] = {c: [] for c in args.commits}
                for rep in range(args.reps):  # alternating, so drift in machine speed hits both
                    for c in args.commits:
                        runs[c].append(probe(trees[c], args.project.resolve(), n, chunk, seed=rep))
                        r = runs[c][-1]
                        print(f"{setting} {c}: {r['seconds']:.1f} s, {r['tokens'] / r['seconds']:.1f} tok/s",
                              flush=True)
                med = {c: statistics.median(r["seconds"] for r in runs[c]) for c in args.commits}
                tps = {c: statistics.median(r["tokens"] / r["seconds"] for r in runs[c]) for c in args.commits}
                same = all(a["responses"] == b["responses"] for a, b in zip(*runs.values()))
                old, new = args.commits
                print(f"{n} prompts, chunks of {chunk}: {old} {med[old]:.1f} s ({tps[old]:.1f} tok/s) → {new} "
                      f"{med[new]:.1f} s ({tps[new]:.1f} tok/s) = {tps[new] / tps[old]:.2f}× tokens/s; "
                      f"responses identical: {same}")
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    print(machine_line())


if __name__ == "__main__":
    main()
