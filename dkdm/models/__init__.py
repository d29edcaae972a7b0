"""Networks with one call signature, ``model(x, t, y=None)``, and the named zoo.

``create_model("cifar10-57M")`` builds a zoo architecture (or one from a YAML file or a
``ModelConfig``); ``load_checkpoint(model, path)`` loads ours or foreign weights strictly.
"""

from .checkpoints import CheckpointError, load_checkpoint, read_state_dict
from .unet import UNetModel
from .vit import ViT
from .zoo import (
    ZOO,
    count_parameters,
    create_model,
    export_yaml,
    get_config,
    list_models,
)

__all__ = [
    "ZOO",
    "CheckpointError",
    "UNetModel",
    "ViT",
    "count_parameters",
    "create_model",
    "export_yaml",
    "get_config",
    "list_models",
    "load_checkpoint",
    "read_state_dict",
]
