"""`lorakit compare`: every method × every seed with the same data order, batch, schedule and budget, then
results.json, report.md, loss.png, params.png, pareto.png and loss_vs_time.png. Resumable per (method, seed), from
the run directories or, where they are gone, from an earlier results.json of the same setting (`--reuse`, reuse.py).

Learning rates: a method's `lr=` is used as given; otherwise `--lr-sweep` (a comma-separated grid for every method,
or `auto`: each method's own grid centred on its documented rate) or the method's own `lr-sweep=a/b/c` (or
`lr-sweep=auto`) runs a short sweep that extends its grid past an end while the best rate sits there (runner.py).

Exact match (greedy answer == reference, `lorakit eval --exact-match`) is measured after each finished run for data
whose task is recall (`uuid-pairs`: its first EXACT_MATCH_DEFAULT_LIMIT pairs), or for any instruction data
when `args.exact_match` is set (> 0)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..atomic import prepare_directory, write_bytes, write_json
from ..errors import ConfigError, LorakitError
from ..training.run_config import TrainConfig, check_writable
from .plots import plot_loss, plot_loss_vs_time, plot_params, plot_pareto
from .report import TRAIN_WINDOW, markdown, status, summarise, summarise_training
from .reuse import ReusedResults
from .runner import (
    EXACT_MATCH_FILE,
    MAX_EXTENSIONS,
    claimed,
    pending,
    run_one,
    score_exact_match,
    sweep_learning_rate,
)
from .spec import SWEEP_FACTOR, initial_grid, parse_methods, parse_numbers, parse_sweep

# uuid-pairs: exact match on its first pairs (greedy decoding takes ~1-3 s a pair on 2 CPU cores)
EXACT_MATCH_DEFAULT_LIMIT = 64
PLOTS = ("loss.png", "params.png", "pareto.png", "loss_vs_time.png")

# `make demo`: the default model and data, about 9 min on 2 CPU cores, each method at the rate the reproduction's
# sweep chose for it on stdlib-docstrings (docs/reproduction/stdlib-docstrings/results.json; tested).
DEMO_RATES = {"lora": 9e-4, "olora": 1e-4, "mini": 9e-3}
DEMO = dict(
    methods=",".join(f"{method}:lr={lr:g}" for method, lr in DEMO_RATES.items()),
    seeds="1",
    steps=40,
    batch_size=4,
    max_length=128,
    eval_every=10,
    eval_limit=32,
    warmup=4,
    rank=16,
    note="Learning rates (the lr column): each method at the rate the reproduction's sweep chose for it on "
    "stdlib-docstrings (docs/reproduction.md; 60 steps, 3 seeds), not one rate for all: "
    + ", ".join(f"{name} {lr:g}" for name, lr in zip(("LoRA", "OLoRA", "LoRA-Mini"), DEMO_RATES.values()))
    + ".",
)


def _apply_demo(args) -> None:
    """Demo values for every setting the user did not give explicitly."""
    given = {token.split("=", 1)[0].lstrip("-").replace("-", "_") for token in args.argv if token.startswith("--")}
    for key, value in DEMO.items():
        if key not in given:
            setattr(args, key, value)


def run_compare_command(args) -> int:
    if args.demo:
        _apply_demo(args)
    specs = parse_methods(args.methods)
    seeds = parse_numbers("--seeds", args.seeds, int)
    if any(seed < 0 for seed in seeds):
        raise ConfigError(f"--seeds {args.seeds} holds a negative seed; use integers >= 0")
    global_sweep = parse_sweep("--lr-sweep", args.lr_sweep) if args.lr_sweep else None
    out = Path(args.out)
    base = TrainConfig.from_args(args, method=specs[0].method, seed=seeds[0], out=str(out / "runs"))
    from ..data import built_in_name, default_eval_source
    from ..data.stdlib_docstrings import NAME as BUILT_IN_DATA

    if base.eval_data is None and built_in_name(base.data) not in (None, BUILT_IN_DATA):
        # a built-in dataset is evaluated on its own eval split (`lorakit train` does so for stdlib-docstrings only)
        base = dataclasses.replace(base, eval_data=default_eval_source(base.data))
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

    for source in {base.data, base.eval_data} - {None, BUILT_IN_DATA}:
        read_records(source)  # a missing or broken file fails once here, not once per run
    exact_match_source, exact_match_limit = _exact_match_plan(args, base)
    setting = {
        k: v for k, v in dataclasses.asdict(base).items() if k not in ("out", "seed", "method", "quiet", "resume")
    }
    reused = ReusedResults(getattr(args, "reuse", None), setting, sweep_steps, MAX_EXTENSIONS)  # checked first
    identity = {
        "methods": [s.label for s in specs],
        "lr_sweep": global_sweep,
        "setting": setting,
    }  # seeds may be added later
    marker = out / "compare.json"
    train = not getattr(args, "report_only", False)
    if not train and not marker.is_file() and not reused.sources:
        raise ConfigError(f"--report-only: --out {out} holds no comparison; run it without --report-only first")
    if marker.is_file() and _read_identity(marker) != identity:
        raise ConfigError(
            f"--out {out} holds a different comparison; use the same flags to resume it or choose a new --out"
        )
    if train:
        prepare_directory(out)
        write_json(marker, identity)

    def collect(train: bool) -> tuple[dict, bool]:
        """Every method's sweep and runs: trained (train=True) or read back from disk (train=False)."""
        methods = {}
        swept = False
        for spec in specs:
            lr, sweep = spec.overrides.get("lr", base.lr), None
            grid = initial_grid(spec, global_sweep)
            earlier = reused.method(spec.label, grid, lr)
            if earlier is not None:
                lr, sweep = earlier.lr, earlier.sweep()
                swept = swept or sweep is not None
            elif grid is not None:
                sweep = sweep_learning_rate(
                    base, spec, grid, sweep_steps, out / "sweep", max_extensions=MAX_EXTENSIONS, train=train
                )
                lr, swept = sweep["lr"], True
            runs = {}
            for seed in seeds:
                if lr is None:  # the sweep has not finished (--report-only, or another compare runs it)
                    runs[str(seed)] = pending("waits for its learning-rate sweep")
                    continue
                cfg = dataclasses.replace(
                    base,
                    **{**spec.overrides, "lr": lr},
                    method=spec.method,
                    seed=seed,
                    out=str(out / "runs" / spec.slug / f"seed-{seed}"),
                )
                run = run_one(cfg, spec.label, train=False)  # a run on disk comes first
                if status(run) == "pending":
                    run = (earlier and earlier.run(seed)) or run_one(cfg, spec.label, train=train)
                runs[str(seed)] = run
                measured = train or (Path(cfg.out) / EXACT_MATCH_FILE).is_file()  # --report-only: measured ones only
                if exact_match_limit and status(run) == "ok" and measured and "reused_from" not in run:
                    run.update(score_exact_match(cfg, exact_match_source, exact_match_limit))
            methods[spec.label] = {
                "method": spec.method,
                "overrides": spec.overrides,
                "lr": lr,
                "lr_sweep": sweep and sweep["losses"],  # {rate: final loss of the short run, or "diverged" / "failed"}
                "runs": runs,
            }
            if earlier is not None:
                methods[spec.label]["reused_from"] = earlier.source
            if sweep is not None:
                methods[spec.label].update(
                    lr_sweep_grid=sweep["grid"],
                    lr_sweep_extended=sweep["extended"],
                    lr_at_sweep_edge=sweep["at_edge"],
                    lr_sweep_finished=sweep["finished"],
                    lr_sweep_pending=bool(sweep.get("pending")),
                )

        return methods, swept

    methods, swept = collect(train)
    # Compares sharing this --out write its outputs one at a time, each from the runs on disk when it writes, so the
    # last one to finish leaves the full report.
    with claimed(out / "outputs", wait=True):
        if train and _pending_runs(methods):  # another compare on this --out held them: report what is on disk now
            methods, swept = collect(False)
            if left := _pending_runs(methods):
                print(f"lorakit compare: {left} runs still train in another compare on {out};")
                print("lorakit compare: the last one to end writes the full report (or use --report-only)")

        methods, target = summarise(methods, args.target_loss)
        train_target = summarise_training(methods)
        has_eval = all(r["eval_curve"] for m in methods.values() for r in m["runs"].values() if status(r) == "ok")
        results = {"setting": setting, "seeds": seeds, "has_eval": has_eval, "target_loss": target, "methods": methods}
        results["train_convergence"] = {"window": TRAIN_WINDOW, "target_loss": train_target}
        if getattr(args, "note", None):
            results["note"] = args.note
        if swept:
            results["sweep"] = {"steps": sweep_steps, "factor": SWEEP_FACTOR, "max_extensions": MAX_EXTENSIONS}
        if exact_match_limit:
            results["exact_match"] = {"data": exact_match_source, "examples": exact_match_limit}
        write_json(out / "results.json", results)
        report = markdown(results)
        write_bytes(out / "report.md", report.encode())
        plot_loss(results, out / "loss.png", log_scale=args.log_scale)
        plot_params(results, out / "params.png")
        plot_pareto(results, out / "pareto.png")
        plot_loss_vs_time(results, out / "loss_vs_time.png", log_scale=args.log_scale)
    print(report.split("\n![loss]")[0], file=sys.stdout)
    print(f"\nwritten: {out / 'results.json'}, {out / 'report.md'}, " + ", ".join(str(out / p) for p in PLOTS))
    failed = [
        (label, seed, run)
        for label, m in methods.items()
        for seed, run in m["runs"].items()
        if run["status"] == "failed"
    ]
    if failed:
        raise RunsFailed(failed, sum(len(m["runs"]) for m in methods.values()), out / "report.md")
    return 0


def _pending_runs(methods: dict) -> int:
    """Runs not finished: in a training compare, the ones another compare on the same --out held (a run, or a
    sweep run that the method's seeds wait for)."""
    return sum(1 for m in methods.values() for r in m["runs"].values() if status(r) == "pending")


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


def _exact_match_plan(args, base) -> tuple[str | None, int]:
    """(data, examples) for the exact-match evaluation after each run; examples 0: none. `args.exact_match` (when
    the CLI gives it) asks for it on any instruction data; by default only recall tasks (uuid-pairs) get it."""
    from ..data import built_in_name, read_records
    from ..data.formats import detect_format
    from ..data.stdlib_docstrings import NAME as BUILT_IN_DATA
    from ..data.uuid_pairs import NAME as UUID_PAIRS

    source = base.eval_data or (base.data if base.data == BUILT_IN_DATA else None)
    requested = getattr(args, "exact_match", None)
    if requested is not None and requested < 0:
        raise ConfigError(f"--exact-match {requested} is invalid; use an integer >= 0 (0: no exact match)")
    if source is None or requested == 0:
        return None, 0
    if requested is None:
        if built_in_name(source) != UUID_PAIRS:
            return None, 0
        requested = EXACT_MATCH_DEFAULT_LIMIT
    records = read_records(source, split="eval")
    if detect_format(records, source) != "instruction":
        raise ConfigError(f"--exact-match needs instruction data; {source} is not; leave --exact-match out")
    return source, min(requested, len(records))


def _read_identity(marker: Path):
    try:
        return json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{marker} is not valid JSON; remove it, or choose a new --out") from None
