"""lorakit: parameter-efficient fine-tuning with LoRA, OLoRA and LoRA-Mini."""

from .config import AdapterConfig
from .errors import (
    AdapterFileError,
    BaseModelMismatchError,
    ConfigError,
    DataError,
    LorakitError,
    ModelLoadError,
)
from .inject import adapt, adapter_layers, disabled, merge, merge_and_unload, summary, unload, unmerge
from .layer import AdapterLayer
from .methods import METHODS

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterLayer",
    "BaseModelMismatchError",
    "ConfigError",
    "DataError",
    "LorakitError",
    "ModelLoadError",
    "adapt",
    "adapter_layers",
    "disabled",
    "merge",
    "merge_and_unload",
    "summary",
    "unload",
    "unmerge",
]
