"""The networks, by name, and their model files.

    model = build_model("preact_resnet18", num_classes=10, in_channels=3)
    save_checkpoint("best.pt", model, {"arch": "preact_resnet18", "num_classes": 10,
                                       "input_shape": (3, 32, 32)})
    model = load_checkpoint("best.pt")  # CPU, eval mode
    model = load_model("any.pt2")       # an advorch checkpoint or a torch.export program

Each architecture lives in its own file and registers itself with ``@register_model``;
importing them here is what fills the registry.
"""

from workers.models import preact_resnet, small_cnn, wide_resnet  # noqa: F401 (registers them)
from workers.models.checkpoint import (
    load_checkpoint,
    load_model,
    model_architecture,
    read_checkpoint_meta,
    save_checkpoint,
)
from workers.models.normalization import Normalization, Normalized
from workers.models.registry import available_models, build_model, register_model

__all__ = [
    "Normalization",
    "Normalized",
    "available_models",
    "build_model",
    "load_checkpoint",
    "load_model",
    "model_architecture",
    "read_checkpoint_meta",
    "register_model",
    "save_checkpoint",
]
