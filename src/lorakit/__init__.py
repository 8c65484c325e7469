"""lorakit: parameter-efficient fine-tuning with LoRA, OLoRA, LoRA-Mini and the methods around them."""

__version__ = "0.1.0"  # before the imports: persist records it in every adapter file

from . import integrations, optim  # lorakit.integrations.ProcedureCallback, lorakit.optim.LoraRite
from .combine import add_weighted_adapter
from .config import AdapterConfig
from .errors import (
    AdapterFileError,
    BaseModelMismatchError,
    ConfigError,
    DataError,
    LorakitError,
    ModelLoadError,
)
from .hotswap import hotswap_adapter
from .inject import (
    adapt,
    adapter_layers,
    adapters,
    delete_adapter,
    disabled,
    merge,
    merge_and_unload,
    set_active,
    summary,
    unload,
    unmerge,
)
from .layer import AdapterLayer
from .methods import METHODS
from .peft_format import export_peft, import_peft
from .persist import load_adapter, read_adapter, save_adapter
from .recompute import recompute_adapter_inputs
from .routing import mixed_batch

__all__ = [
    "METHODS",
    "integrations",
    "optim",
    "AdapterConfig",
    "AdapterFileError",
    "AdapterLayer",
    "BaseModelMismatchError",
    "ConfigError",
    "DataError",
    "LorakitError",
    "ModelLoadError",
    "adapt",
    "add_weighted_adapter",
    "adapter_layers",
    "hotswap_adapter",
    "mixed_batch",
    "adapters",
    "delete_adapter",
    "set_active",
    "disabled",
    "export_peft",
    "import_peft",
    "load_adapter",
    "read_adapter",
    "recompute_adapter_inputs",
    "save_adapter",
    "merge",
    "merge_and_unload",
    "summary",
    "unload",
    "unmerge",
]
