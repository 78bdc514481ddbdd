"""fxadapt: adapters for Hugging Face models, compiled into the graph.

``fxadapt.inject(model, {"sst-2": "seq_bn"})`` traces each of the model's layers with torch.fx, finds the sites
(attention/FFN outputs on the residual stream, projections), inserts adapter nodes there and installs the generated
code into the layers, in place. The model keeps its class, its Hugging Face API and its state_dict keys.
"""

__version__ = "0.1.0"

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .api import (
    activate,
    active_adapters,
    active_setup,
    adapter_parameters,
    adapter_state,
    add_fusion,
    eject_prefix,
    explain,
    fusion_parameters,
    fusion_regularization_loss,
    inject,
    list_adapters,
    merge,
    remove,
    remove_fusion,
    train_adapter,
    train_fusion,
    unmerge,
)
from .calls import using
from .compose import Average, BatchSplit, Fuse, Parallel, PerRow, Split, Stack
from .errors import (
    AdapterIdsError,
    AdapterNotFoundError,
    CaptureError,
    CheckpointError,
    CompositionError,
    ConfigError,
    ConfigFieldError,
    FxAdaptError,
    NameCollisionError,
    NotMergeableError,
    SavePathError,
    SiteNotFoundError,
)
from .export import aot_package, export, load_package
from .formats.adapterhub_fusion import load_adapter_fusion, save_adapter_fusion
from .fusion import FusionConfig
from .io import load_adapter, save_adapter
from .methods.bottleneck import BottleneckConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoRAConfig
from .methods.mtl_lora import MTLLoRAConfig
from .methods.prefix import PrefixTuningConfig
from .methods.prompt import PromptTuningConfig
from .methods.reft import ReftConfig
from .methods.union import ConfigUnion
from .progress import progress_bars
from .routing import adapter_ids
from .tracing import prepare

__all__ = [
    "AdapterIdsError",
    "AdapterNotFoundError",
    "AdapterTrainer",
    "Average",
    "BatchSplit",
    "BottleneckConfig",
    "CaptureError",
    "CheckpointError",
    "CompositionError",
    "ConfigError",
    "ConfigFieldError",
    "ConfigUnion",
    "Fuse",
    "FusionConfig",
    "FxAdaptError",
    "IA3Config",
    "LoRAConfig",
    "MTLLoRAConfig",
    "NameCollisionError",
    "NotMergeableError",
    "Parallel",
    "PerRow",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "ReftConfig",
    "SavePathError",
    "SiteNotFoundError",
    "Split",
    "Stack",
    "__version__",
    "activate",
    "active_adapters",
    "active_setup",
    "adapter_ids",
    "adapter_parameters",
    "adapter_state",
    "add_fusion",
    "aot_package",
    "eject_prefix",
    "explain",
    "export",
    "fusion_parameters",
    "fusion_regularization_loss",
    "inject",
    "list_adapters",
    "load_adapter",
    "load_adapter_fusion",
    "load_package",
    "merge",
    "prepare",
    "progress_bars",
    "remove",
    "remove_fusion",
    "save_adapter",
    "save_adapter_fusion",
    "train_adapter",
    "train_fusion",
    "unmerge",
    "using",
]


def __getattr__(name: str):  # AdapterTrainer imports transformers' Trainer (heavy): only when asked for
    if name == "AdapterTrainer":
        from .trainer import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module 'fxadapt' has no attribute {name!r}")
