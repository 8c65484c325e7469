"""`lorakit compare`: every method × every seed with the same data order, batch, schedule and budget, then
results.json, report.md, loss.png and params.png. Resumable per (method, seed)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..atomic import prepare_directory, write_bytes, write_json
from ..errors import ConfigError, LorakitError
from ..training.run_config import check_writable
from .plots import plot_loss, plot_params
from .report import markdown, status, summarise
from .runner import run_one, sweep_learning_rate
from .spec import parse_methods, parse_numbers

# `make demo`: the default model and data, each method at a learning rate that suits it, ~10 min on 2 CPU cores.
DEMO = dict(
    methods="lora:lr=3e-4,olora:lr=3e-4,mini:lr=3e-3",
    seeds="1",
    steps=40,
    batch_size=4,
    max_length=128,
    eval_every=10,
    eval_limit=32,
    warmup=4,
    rank=16,
)


def _apply_demo(args) -> None:
    """Demo values for every setting the user did not give explicitly."""
    given = {token.split("=", 1)[0].lstrip("-").replace("-", "_") for token in args.argv if token.startswith("--")}
    for key, value in DEMO.items():
        if key not in given:
            setattr(args, key, value)


def run_compare_command(args) -> int:
    from ..commands import train_config_from_args

    if args.demo:
        _apply_demo(args)
    specs = parse_methods(args.methods)
    seeds = parse_numbers("--seeds", args.seeds, int)
    if any(seed < 0 for seed in seeds):
        raise ConfigError(f"--seeds {args.seeds} holds a negative seed; use integers >= 0")
    rates = parse_numbers("--lr-sweep", args.lr_sweep, float) if args.lr_sweep else None
    out = Path(args.out)
    base = train_config_from_args(args, method=specs[0].method, seed=seeds[0], out=str(out / "runs"))
    if args.sweep_steps < 0:
        raise ConfigError(
            f"--sweep-steps {args.sweep_steps} is invalid; use a positive integer (0: a quarter of --steps)"
        )
    sweep_steps = args.sweep_steps or max(1, base.steps // 4)
    if base.save_every == 0:
        base = dataclasses.replace(base, save_every=max(1, base.steps // 5))  # so that a compare can resume
    for spec in specs:  # every setting is checked before anything runs
        try:
            dataclasses.replace(base, **spec.overrides, method=spec.method).validate()
        except ConfigError as exc:
            raise ConfigError(f"--methods {spec.label}: {exc}") from None
    check_writable(out)
    from ..data import read_records
    from ..data.stdlib_docstrings import NAME as BUILT_IN_DATA

    for source in {base.data, base.eval_data} - {None, BUILT_IN_DATA}:
        read_records(source)  # a missing or broken file fails once here, not once per run
    setting = {
        k: v for k, v in dataclasses.asdict(base).items() if k not in ("out", "seed", "method", "quiet", "resume")
    }
    identity = {"methods": [s.label for s in specs], "lr_sweep": rates, "setting": setting}  # seeds may be added later
    marker = out / "compare.json"
    if marker.is_file() and _read_identity(marker) != identity:
        raise ConfigError(
            f"--out {out} holds a different comparison; use the same flags to resume it or choose a new --out"
        )
    prepare_directory(out)
    write_json(marker, identity)

    methods = {}
    for spec in specs:
        lr, sweep = spec.overrides.get("lr", base.lr), None
        if rates and "lr" not in spec.overrides:
            lr, sweep = sweep_learning_rate(base, spec, rates, sweep_steps, out / "sweep")
        runs = {}
        for seed in seeds:
            cfg = dataclasses.replace(
                base,
                **{**spec.overrides, "lr": lr},
                method=spec.method,
                seed=seed,
                out=str(out / "runs" / spec.slug / f"seed-{seed}"),
            )
            runs[str(seed)] = run_one(cfg, spec.label)
        methods[spec.label] = {
            "method": spec.method,
            "overrides": spec.overrides,
            "lr": lr,
            "lr_sweep": sweep,
            "runs": runs,
        }

    methods, target = summarise(methods, args.target_loss)
    has_eval = all(r["eval_curve"] for m in methods.values() for r in m["runs"].values() if status(r) == "ok")
    results = {"setting": setting, "seeds": seeds, "has_eval": has_eval, "target_loss": target, "methods": methods}
    write_json(out / "results.json", results)
    report = markdown(results)
    write_bytes(out / "report.md", report.encode())
    plot_loss(results, out / "loss.png", log_scale=args.log_scale)
    plot_params(results, out / "params.png")
    print(report.split("\n![loss]")[0], file=sys.stdout)
    print(f"\nwritten: {out / 'results.json'}, {out / 'report.md'}, {out / 'loss.png'}, {out / 'params.png'}")
    failed = [
        (label, seed, run)
        for label, m in methods.items()
        for seed, run in m["runs"].items()
        if run["status"] == "failed"
    ]
    if failed:
        raise RunsFailed(failed, sum(len(m["runs"]) for m in methods.values()), out / "report.md")
    return 0


class RunsFailed(LorakitError):
    """Some runs of a comparison failed (the report holds the others). Exit code 2 when every failure was a user
    error (the children exited with 2), else 1."""

    def __init__(self, failed: list, total: int, report: Path):
        label, seed, run = failed[0]
        super().__init__(
            f"{len(failed)} of {total} runs failed (first: {label} seed {seed}: {run.get('error')}); they are "
            f"reported as failed in {report}; fix the problem and run the same command again to redo them"
        )
        self.exit_code = 2 if all(run.get("exit_code") == 2 for _, _, run in failed) else 1


def _read_identity(marker: Path):
    try:
        return json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{marker} is not valid JSON; remove it, or choose a new --out") from None
