"""`lorakit compare --reuse RESULTS.json`: the finished runs of an earlier comparison stand in for training them.

A comparison's run directories are its resumable state; when they are gone (a new machine, a fresh clone, a
cleaned disk) its results.json still holds every finished run's outcome: the summary, the train/eval/time curves,
the learning-rate sweep. `--reuse` reads that file (or several) and, for each method of this comparison, takes
the sweep and the finished runs of the method with the same label, so only what is missing is trained:

- the earlier comparison must have the same setting (model, data, budget, every training flag); a different
  setting is refused with the keys that differ, since its runs would not be comparable;
- a method is taken only with the same learning-rate plan: the same initial sweep grid, sweep steps and
  extension limit, and a sweep that had finished (else it is swept again, and its runs trained);
- a run is taken when it had ended "ok" or "diverged" (outcomes, not accidents); "failed" or "pending" runs, and
  seeds the earlier comparison did not have, are trained here at the reused learning rate.

Run directories on disk come first: a run finished here is never replaced by a reused one. Reused runs carry no
adapter (the file was not part of results.json), so what needs one (exact match of a run that was not measured)
is not redone. Each reused method records `reused_from` in results.json and the report says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

FINAL = ("ok", "diverged")  # run outcomes worth keeping; "failed" and "pending" runs are trained again


@dataclass(frozen=True)
class ReusedMethod:
    source: str
    entry: dict

    @property
    def lr(self) -> float:
        return self.entry["lr"]

    def sweep(self) -> dict | None:
        """The sweep as `runner.sweep_learning_rate` returns it, or None when the method was not swept."""
        if self.entry.get("lr_sweep_grid") is None:
            return None
        return {
            "lr": self.lr,
            "losses": self.entry.get("lr_sweep"),
            "grid": self.entry["lr_sweep_grid"],
            "extended": self.entry.get("lr_sweep_extended") or [],
            "at_edge": bool(self.entry.get("lr_at_sweep_edge")),
            "finished": True,
            "pending": False,
        }

    def run(self, seed: int) -> dict | None:
        """The earlier outcome of `seed`, when it had ended ("ok" or "diverged"); else None (train it)."""
        run = (self.entry.get("runs") or {}).get(str(seed))
        if not isinstance(run, dict) or run.get("status") not in FINAL:
            return None
        return {**run, "reused_from": self.source}


class ReusedResults:
    """The results.json files given to --reuse, checked against this comparison's setting and sweep plan."""

    def __init__(self, paths: list[str], setting: dict, sweep_steps: int, max_extensions: int):
        self.sweep_steps, self.max_extensions = sweep_steps, max_extensions
        self.sources = [(str(path), _read(Path(path), setting)) for path in paths or ()]

    def method(self, label: str, grid: list[float] | None, lr: float | None) -> ReusedMethod | None:
        """The first source's entry for `label` with the same learning-rate plan and a finished sweep."""
        for source, results in self.sources:
            entry = results["methods"].get(label)
            if isinstance(entry, dict) and self._same_plan(results, entry, grid, lr):
                return ReusedMethod(source, entry)
        return None

    def _same_plan(self, results: dict, entry: dict, grid: list[float] | None, lr: float | None) -> bool:
        if not isinstance(entry.get("lr"), (int, float)) or not isinstance(entry.get("runs"), dict):
            return False  # its sweep had not chosen a rate
        if grid is None:
            return entry.get("lr_sweep_grid") is None and _same_rate(entry["lr"], lr)
        sweep = results.get("sweep") or {}
        return (
            _same_rates(entry.get("lr_sweep_grid"), grid)
            and bool(entry.get("lr_sweep_finished"))
            and sweep.get("steps") == self.sweep_steps
            and sweep.get("max_extensions") == self.max_extensions
        )


def _read(path: Path, setting: dict) -> dict:
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--reuse {path}: no such file; give the results.json of an earlier comparison") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"--reuse {path} could not be read as JSON ({type(exc).__name__}); give the results.json of an earlier "
            "comparison"
        ) from None
    if not isinstance(results, dict) or not isinstance(results.get("methods"), dict) or "setting" not in results:
        raise ConfigError(f"--reuse {path} is not a comparison's results.json (no 'setting' and 'methods')")
    if results["setting"] != setting:
        theirs = results["setting"] if isinstance(results["setting"], dict) else {}
        differ = sorted(k for k in set(theirs) | set(setting) if theirs.get(k, "—") != setting.get(k, "—"))
        shown = ", ".join(f"{k} ({theirs.get(k, '—')} there, {setting.get(k, '—')} here)" for k in differ[:4])
        raise ConfigError(
            f"--reuse {path} holds a comparison with another setting: {shown}"
            f"{' and more' if len(differ) > 4 else ''}; reuse only the results of the same flags"
        )
    return results


def _same_rate(a, b) -> bool:
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)


def _same_rates(a, b) -> bool:
    return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(_same_rate, a, b))
