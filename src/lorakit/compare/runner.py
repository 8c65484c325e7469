"""Run the (method, seed) experiments of a comparison, each as its own `lorakit train` process.

A separate process per run gives each its own peak-memory figure and keeps one failure from ending the rest.
Every run ends with a status: "ok" (summary.json written), "diverged" (the child stopped on a non-finite loss,
exit code `TrainingDiverged.exit_code`) or "failed" (any other exit: a user error, exit 2, or a crash), with the
child's one-line error. Runs are resumable: a finished or diverged run is skipped, one with checkpoints continues
with --resume, a failed one starts again.

Several compares can share one --out (the same command in N shells, one per core or GPU): a run is trained under an
exclusive lock on `.<run>.lock` beside its directory, and a compare that finds a run locked skips it (and, in a
sweep, the rest of that method) and goes on to the next; whichever finishes last reports every run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from ..atomic import write_json
from ..training.checkpoint import checkpoint_dirs
from ..training.loop import TrainingDiverged
from ..training.run_config import TrainConfig
from .spec import SWEEP_FACTOR, MethodSpec, round_rate

DIVERGED_EXIT = TrainingDiverged.exit_code
DIVERGED_MARKER = "diverged.json"  # in a diverged run's directory: a resumed compare does not train it again
ERROR_LINE = re.compile(r"lorakit(?: [a-z]+)?: ((?:internal )?error: .*)")
MAX_EXTENSIONS = 3  # a sweep extends its grid past an end at most this many times
EXACT_MATCH_FILE = "exact_match.json"
TAKEN = "another compare on this --out is training it"


def pending(reason: str = "not finished yet") -> dict:
    """The outcome of a run that has not finished, in a report written with `--report-only`."""
    return {
        "status": "pending",
        "diverged": False,
        "error": reason,
        "train_curve": [],
        "eval_curve": [],
        "time_curve": [],
    }


def run_one(cfg: TrainConfig, label: str, *, train: bool = True) -> dict:
    """Train (or resume, or skip if done) one run; returns its outcome, read back from disk. With train=False
    nothing is trained: a run that has not finished is `pending()`."""
    out = Path(cfg.out)
    if (out / "summary.json").is_file():
        return _finished(out)
    if (out / DIVERGED_MARKER).is_file():
        return {**json.loads((out / DIVERGED_MARKER).read_text()), **read_curves(out)}
    if not train:
        return pending()
    with claimed(out) as mine:
        if not mine:
            print(f"lorakit compare: {label} seed {cfg.seed}: {TAKEN}; skipped", flush=True)
            return pending(TAKEN)
        if (out / "summary.json").is_file() or (out / DIVERGED_MARKER).is_file():  # finished by the other compare
            return run_one(cfg, label, train=False)
        return _train(cfg, label, out)


@contextlib.contextmanager
def claimed(run_dir: Path, *, wait: bool = False):
    """Yields True while this process holds the exclusive lock on `run_dir`; without `wait`, False at once when
    another process holds it. The lock is the kernel's (flock), so it ends with its process, even after kill -9."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one compare per --out
        yield True
        return
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train(cfg: TrainConfig, label: str, out: Path) -> dict:
    resume = bool(checkpoint_dirs(out)) and (out / "run.json").is_file()
    if out.exists() and not resume:
        shutil.rmtree(out)  # an interrupted or failed run without checkpoint starts over
    cfg = dataclasses.replace(cfg, resume=resume)
    print(f"lorakit compare: {label} seed {cfg.seed} lr {cfg.lr:g}{' (resumed)' if resume else ''}", flush=True)
    code, stderr_tail = run_teeing_stderr([sys.executable, "-m", "lorakit", "train", *cfg.to_argv()])
    if code == 0 and (out / "summary.json").is_file():
        return _finished(out)
    if code in (130, -signal.SIGINT):
        raise KeyboardInterrupt
    status = "diverged" if code == DIVERGED_EXIT else "failed"
    outcome = {"status": status, "diverged": status == "diverged", "error": error_line(stderr_tail, code)}
    outcome["exit_code"] = code
    print(f"lorakit compare: {label} seed {cfg.seed} {status}: {outcome['error']}", flush=True)
    if status == "diverged" and out.is_dir():
        write_json(out / DIVERGED_MARKER, outcome)
    return {**outcome, **read_curves(out)}


def _finished(out: Path) -> dict:
    outcome = {"status": "ok", "diverged": False, **json.loads((out / "summary.json").read_text()), **read_curves(out)}
    outcome["adapter_parameters"] = adapter_parameters(out / "adapter")  # None: the report falls back to trainable
    return outcome


def adapter_parameters(adapter_dir: Path) -> int | None:
    """The parameters the saved adapter trains when loaded (its adapter.json), which a procedure can make differ from
    the run's trainable parameters: Chain of LoRA keeps every link (3 links: 3x), IncreLoRA keeps only the ranks it
    allocated (its capacity trains nothing until allocated), XGBLoRA keeps every round's boosters."""
    try:
        value = json.loads((adapter_dir / "adapter.json").read_text()).get("trainable_parameters")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) else None


def run_teeing_stderr(command: list[str], keep: int = 1 << 16) -> tuple[int, str]:
    """Run `command`; its stdout goes to ours, its stderr is copied to ours as it comes (progress bars included)
    and its last `keep` bytes are returned with the exit code."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    sink = getattr(sys.stderr, "buffer", None)
    tail = b""
    try:
        while chunk := os.read(proc.stderr.fileno(), 4096):
            tail = (tail + chunk)[-keep:]
            if sink is not None:
                sink.write(chunk)
                sink.flush()
            else:  # a replaced sys.stderr (tests capturing output) takes text
                sys.stderr.write(chunk.decode(errors="replace"))
    finally:
        proc.stderr.close()
        code = proc.wait()
    return code, tail.decode(errors="replace")


def error_line(stderr: str, code: int) -> str:
    """The child's one-line error: its last `lorakit: error:` line, else its last line, else how it ended."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    for line in reversed(lines):
        match = ERROR_LINE.match(line)
        if match:
            return match[1].removeprefix("error: ")
    if code < 0:
        return (
            f"killed by signal {signal.Signals(-code).name}"
            if -code in signal.valid_signals()
            else f"killed by signal {-code}"
        )
    return f"exit code {code}" + (f": {lines[-1][:300]}" if lines else "")


def read_curves(out: Path) -> dict:
    """Train and eval loss against step, and wall time against step ("time_curve": [step, elapsed_s], with
    [0, 0.0] for the evaluation before training) from DIR/log.jsonl."""
    log = out / "log.jsonl"
    lines = [json.loads(l) for l in log.read_text().splitlines() if l.strip()] if log.is_file() else []
    times = [[l["step"], l["elapsed_s"]] for l in lines if "elapsed_s" in l]
    if lines and lines[0].get("step") == 0:
        times.insert(0, [0, 0.0])
    return {
        "train_curve": [[l["step"], l["loss"]] for l in lines if "loss" in l],
        "eval_curve": [[l["step"], l["eval_loss"]] for l in lines if "eval_loss" in l],
        "time_curve": times,
    }


def final_loss(outcome: dict) -> float | None:
    """The final (eval, else smoothed train) loss of a finished run; None for a diverged or failed run, or a
    non-finite loss (which the aggregates must never see)."""
    if outcome.get("status", "diverged" if outcome.get("diverged") else "ok") != "ok":
        return None
    value = outcome.get("final_eval_loss")
    if value is None:  # no eval data: the mean of the last tenth of the train curve
        curve = [loss for _, loss in outcome.get("train_curve") or []]
        if not curve:
            return None
        tail = curve[-max(1, len(curve) // 10) :]
        value = sum(tail) / len(tail)
    return value if math.isfinite(value) else None


def sweep_learning_rate(
    base: TrainConfig,
    spec: MethodSpec,
    rates: list[float],
    steps: int,
    root: Path,
    *,
    max_extensions: int = MAX_EXTENSIONS,
    factor: float = SWEEP_FACTOR,
    train: bool = True,
) -> dict:
    """Short runs (first seed, `steps` steps) at each rate of the grid; while the best rate is at an end of the grid,
    one more rate `factor` past that end, at most `max_extensions` times. No rate finished but some diverged: the
    grid extends downwards the same way.

    Returns {"lr": the best rate, "losses": {rate: final loss, or "diverged" / "failed"} in increasing rate order,
    "grid": the initial grid, "extended": the rates added (in order), "at_edge": True when the limit was reached
    with the best rate still at an end (or with no rate finished and some diverged), "finished": whether any rate
    finished (if none did, "lr" is the lowest rate tried)}.

    With train=False (`--report-only`) nothing is trained: at the first rate not yet run the sweep stops and returns
    "lr": None and "pending": True, with the losses known so far (that rate's is "pending")."""
    grid = sorted(round_rate(lr) for lr in rates)
    losses: dict[float, float | str] = {}

    def run(lr: float) -> None:
        cfg = dataclasses.replace(
            base,
            **{**spec.overrides, "lr": lr},
            method=spec.method,
            steps=steps,
            out=str(root / spec.slug / f"lr-{lr:g}"),
            save_every=0,
        )
        outcome = run_one(cfg, f"{spec.label} (lr sweep)", train=train)
        loss = final_loss(outcome)
        failure = outcome.get("status") if outcome.get("status") in ("failed", "pending") else "diverged"
        losses[lr] = loss if loss is not None else failure

    def result(extended: list[float], best: float | None = None, *, at_edge: bool = False, pending: bool = False):
        outcome = {
            "lr": None if pending else (best if best is not None else min(losses)),
            "losses": {f"{lr:g}": losses[lr] for lr in sorted(losses)},
            "grid": sorted(round_rate(lr) for lr in rates),
            "extended": extended,
            "at_edge": at_edge,
            "finished": best is not None,
        }
        return {**outcome, "pending": True} if pending else outcome

    for lr in grid:
        run(lr)
        if losses[lr] == "pending":
            return result([], pending=True)
    extended: list[float] = []
    while True:
        finished = [lr for lr in grid if not isinstance(losses[lr], str)]
        best = min(finished, key=lambda lr: losses[lr]) if finished else None
        if best is None:  # nothing finished: lower rates if something diverged, else (all failed) give up
            direction = "down" if any(losses[lr] == "diverged" for lr in grid) else None
        elif best == grid[-1]:
            direction = "up"
        elif best == grid[0]:
            direction = "down"
        else:
            direction = None
        if direction is None or len(extended) >= max_extensions:
            break
        lr = round_rate(grid[-1] * factor if direction == "up" else grid[0] / factor)
        run(lr)
        grid = sorted([*grid, lr])
        extended.append(lr)
        if losses[lr] == "pending":
            return result(extended, pending=True)
    return result(extended, best, at_edge=direction is not None)  # the limit was reached, best still at an end


def score_exact_match(cfg: TrainConfig, data: str, examples: int) -> dict:
    """Greedy exact match of a finished run's adapter on the first `examples` records of `data` (its eval split),
    measured by `lorakit eval --exact-match` in its own process and kept in DIR/exact_match.json (a resumed compare
    reads it back). Returns {"exact_match", "exact_match_examples"} or, if the evaluation failed,
    {"exact_match": None, "exact_match_error"}."""
    out = Path(cfg.out)
    marker = out / EXACT_MATCH_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("data") == data and saved.get("requested") == examples:
            return {k: saved[k] for k in ("exact_match", "exact_match_examples")}
    command = [
        sys.executable, "-m", "lorakit", "eval", "--model", cfg.model, "--adapter", str(out / "adapter"),
        "--data", data, "--max-length", str(cfg.max_length), "--batch-size", str(cfg.batch_size),
        "--limit", "1", "--exact-match", str(examples),
    ]  # fmt: skip
    if cfg.trust_remote_code:
        command.append("--trust-remote-code")
    print(f"lorakit compare: exact match of {out} on {examples} examples", flush=True)
    proc = subprocess.run(command, capture_output=True, text=True)
    result = None
    for line in reversed(proc.stdout.splitlines()):
        try:
            result = json.loads(line)
            break
        except json.JSONDecodeError:
            continue
    if proc.returncode != 0 or not isinstance(result, dict) or "exact_match" not in result:
        error = (
            error_line(proc.stderr, proc.returncode) if proc.returncode else "no exact match (not instruction data?)"
        )
        print(f"lorakit compare: exact match failed: {error}", flush=True)
        return {"exact_match": None, "exact_match_error": error}
    scored = {"exact_match": result["exact_match"], "exact_match_examples": result["exact_match_examples"]}
    write_json(marker, {"data": data, "requested": examples, **scored})
    return scored
