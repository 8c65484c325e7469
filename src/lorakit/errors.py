"""User-facing errors.

Every problem a user can fix (bad flag, bad file, wrong base model) is raised as a `LorakitError` whose message is
one line naming the problem and the fix. The CLI prints it and exits with code 2; library users can catch it.
"""


class LorakitError(Exception):
    """A problem with the user's input, not a bug in lorakit."""


class ConfigError(LorakitError, ValueError):
    """An invalid adapter configuration or argument."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter directory that is missing, corrupt, truncated or of an unsupported format."""


class BaseModelMismatchError(AdapterFileError):
    """An adapter applied to a base model it was not trained on: `problem` (what differs) and `fix` (what to do),
    shown as one line "problem; fix". A caller with its own remedy (a CLI flag) keeps the problem and states its own
    fix."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


# the fix for weights that differ, where strict=False would apply the adapter anyway
APPLY_ANYWAY = "or pass strict=False (CLI: --no-strict) to apply it anyway"


class DataError(LorakitError, ValueError):
    """A dataset file that is missing, empty or cannot be parsed."""


class ModelLoadError(LorakitError, ValueError):
    """A model path or id that cannot be loaded."""
