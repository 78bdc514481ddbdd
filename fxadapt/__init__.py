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
    adapter_parameters,
    explain,
    inject,
    list_adapters,
    merge,
    remove,
    train_adapter,
    unmerge,
)
from .errors import (
    AdapterNotFoundError,
    CaptureError,
    CheckpointError,
    CompositionError,
    ConfigError,
    FxAdaptError,
    NameCollisionError,
    NotMergeableError,
    SiteNotFoundError,
)
from .io import load_adapter, save_adapter
from .methods.bottleneck import BottleneckConfig

__all__ = [
    "AdapterNotFoundError",
    "BottleneckConfig",
    "CaptureError",
    "CheckpointError",
    "CompositionError",
    "ConfigError",
    "FxAdaptError",
    "NameCollisionError",
    "NotMergeableError",
    "SiteNotFoundError",
    "__version__",
    "activate",
    "active_adapters",
    "adapter_parameters",
    "explain",
    "inject",
    "list_adapters",
    "load_adapter",
    "merge",
    "remove",
    "save_adapter",
    "train_adapter",
    "unmerge",
]
