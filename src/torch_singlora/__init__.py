"""singlora: SingLoRA (low-rank adaptation with a single matrix, ``W = W0 + (alpha/r) * u(t) * A A^T``) for PyTorch.

Quick start::

    from torch_singlora import SingLoRAConfig, get_singlora_model
    model = get_singlora_model(model, SingLoRAConfig(r=8, alpha=8, target_modules="all-linear"))
    model.bind_optimizer(optimizer, total_steps=1000)   # u(t) follows optimizer steps; T = 1% of the run
"""

from .adapter_file import CONFIG_FILE, FORMAT_NAME, FORMAT_VERSION, WEIGHTS_FILE
from .config import SingLoRAConfig
from .errors import AdapterFileError, SingLoRAError
from .functional import delta_matrix, delta_weight, lora_factors, matrix_dims
from .copies import TrainableCopy
from .layers import SingLoRAAdapter, SingLoRALayer
from .model import SingLoRAModel, get_singlora_model

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "CONFIG_FILE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SingLoRAAdapter",
    "SingLoRAConfig",
    "SingLoRAError",
    "SingLoRALayer",
    "SingLoRAModel",
    "TrainableCopy",
    "WEIGHTS_FILE",
    "delta_matrix",
    "delta_weight",
    "get_singlora_model",
    "lora_factors",
    "matrix_dims",
]
