"""Models by name: ``@register_model("name")`` on a constructor, ``build_model("name")``
to call it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import nn

from workers.models.normalization import Normalization, Normalized


class ModelConstructor(Protocol):
    def __call__(self, num_classes: int = 10, in_channels: int = 3) -> nn.Module: ...


_MODELS: dict[str, ModelConstructor] = {}


def register_model(name: str) -> Callable[[ModelConstructor], ModelConstructor]:
    """Register a constructor ``(num_classes, in_channels) -> nn.Module`` under ``name``."""

    def register(constructor: ModelConstructor) -> ModelConstructor:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = constructor
        return constructor

    return register


def available_models() -> list[str]:
    return sorted(_MODELS)


def build_model(
    arch: str,
    num_classes: int = 10,
    in_channels: int = 3,
    normalization: Normalization | None = None,
) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (see ``available_models()``),
    behind ``normalization`` as its first layer when given."""
    try:
        constructor = _MODELS[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; available: {available_models()}") from None
    model = constructor(num_classes=num_classes, in_channels=in_channels)
    return model if normalization is None else Normalized(model, normalization)
