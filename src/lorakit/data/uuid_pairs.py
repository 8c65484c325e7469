"""`uuid-pairs`: MoRA's memorisation task (Jiang et al. 2024, arXiv 2405.12130: pairs of random UUIDs, the model
learns to answer the second UUID of a pair when given the first).

instruction = the first UUID of a pair (the key), no input
output      = the second UUID (the value)

`uuid-pairs` gives DEFAULT_PAIRS pairs from seed DEFAULT_SEED; `uuid-pairs:n=256,seed=1` chooses both. Deterministic:
the pairs come from `random.Random(seed)` as version-4 UUIDs, every UUID is distinct, and the first n pairs of a
larger n are the same pairs (so `n=64` is a subset of `n=256` for the same seed).

Train and eval are the SAME pairs, on purpose: the task is to recall what was trained, so there is nothing held out.
The eval loss measures how well the pairs were memorised, and exact match (greedy answer == the value) is the
task's score; MoRA reports character-level accuracy, which is between the two. The paper used 10,000 pairs for 100
epochs on LLaMA-2 7B (the default n here); on a CPU use a few hundred pairs and many epochs over them.
"""

from __future__ import annotations

import random
import uuid

from ..errors import DataError

NAME = "uuid-pairs"
DEFAULT_PAIRS = 10_000  # as in the MoRA paper
DEFAULT_SEED = 0
MAX_PAIRS = 1_000_000
SPLITS_ARE_THE_SAME = True  # memorisation: eval = train


def parse_options(options: str) -> tuple[int, int]:
    """(n, seed) from "n=256,seed=1" (either may be left out; ':' also separates them)."""
    values = {"n": DEFAULT_PAIRS, "seed": DEFAULT_SEED}
    for part in filter(None, (p.strip() for p in options.replace(":", ",").split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in values:
            raise DataError(f"{NAME}: option {part!r} is unknown; use {NAME}:n=N,seed=S (e.g. {NAME}:n=256,seed=0)")
        try:
            values[key] = int(value)
        except ValueError:
            raise DataError(f"{NAME}: {key}={value!r} is not an integer; use e.g. {NAME}:n=256,seed=0") from None
    if not 1 <= values["n"] <= MAX_PAIRS:
        raise DataError(f"{NAME}: n={values['n']} is out of range; use 1 <= n <= {MAX_PAIRS:,}")
    if values["seed"] < 0:
        raise DataError(f"{NAME}: seed={values['seed']} is negative; use an integer >= 0")
    return values["n"], values["seed"]


def generate(n: int = DEFAULT_PAIRS, seed: int = DEFAULT_SEED) -> list[dict]:
    """n pairs {"instruction": key, "output": value} of distinct random version-4 UUIDs."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []

    def draw() -> str:
        while True:
            value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if value not in seen:
                seen.add(value)
                return value

    for _ in range(n):
        key = draw()
        records.append({"instruction": key, "output": draw()})
    return records


def load(split: str = "train", options: str = "") -> list[dict]:
    """The pairs; every split ("train", "eval", ...) holds the same pairs (memorisation)."""
    n, seed = parse_options(options)
    return generate(n, seed)
