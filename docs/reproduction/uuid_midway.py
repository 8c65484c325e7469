"""Exact match of MoRA's and LoRA's UUID runs part-way through training, from the checkpoints the runs kept.

    python docs/reproduction/uuid_midway.py [runs/claims-uuid] [step]     (default step 96 of the 160)

At the end of its 160 steps each run recalls (almost) all 64 pairs, so the final exact match cannot separate the
methods; the eval loss says MoRA memorises faster. This measures the same thing in the paper's own metric: greedy
exact match on all 64 pairs of each seed's adapter at `step` (a checkpoint the run saved while training: its
weights at that step of the 160-step cosine schedule, not a shorter run). Each evaluation is `lorakit eval
--exact-match 64` in its own process, on the model the run trained. Results go to
docs/reproduction/uuid-pairs/midway.json; evaluations already there are not repeated.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

DATA, PAIRS = "uuid-pairs:n=64", 64
OUT = Path(__file__).parent / "uuid-pairs" / "midway.json"


def evaluate(checkpoint: Path, model: str) -> dict:
    command = [sys.executable, "-m", "lorakit", "eval", "--model", model, "--adapter", str(checkpoint)]
    command += ["--data", DATA, "--limit", str(PAIRS), "--exact-match", str(PAIRS)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{checkpoint}: lorakit eval failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(root: Path, step: int) -> None:
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for run in sorted(root.glob("runs/*/seed-*")):
        key = f"{run.parent.name}/{run.name}/step-{step}"
        checkpoint = run / "checkpoints" / f"step-{step:06d}"
        if key in results or not checkpoint.is_dir():
            continue
        model = json.loads((run / "run.json").read_text())["config"]["model"]
        result = evaluate(checkpoint, model)
        results[key] = {"eval_loss": result["eval_loss"], "exact_match": result["exact_match"]}
        print(key, results[key], flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    for method in sorted({key.split("/")[0] for key in results}):
        ours = [value for key, value in results.items() if key.startswith(f"{method}/") and key.endswith(f"-{step}")]
        matches = [round(value["exact_match"] * PAIRS) for value in ours]
        losses = [value["eval_loss"] for value in ours]
        spread = f" ± {statistics.stdev(losses):.3f}" if len(losses) > 1 else ""
        print(f"{method} at step {step}: exact match {' / '.join(map(str, matches))} of {PAIRS}; "
              f"eval loss {statistics.fmean(losses):.3f}{spread} ({len(ours)} seeds)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/claims-uuid"), int(sys.argv[2]) if len(sys.argv) > 2 else 96)
