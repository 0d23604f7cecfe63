"""A small CNN that trains in seconds on the CPU: for 8x8 digits and 32x32 images alike."""

from __future__ import annotations

import torch
from torch import nn

from workers.models.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers, two 2x2 max-pools, global average pooling and a linear head.

    Global pooling is what makes one network fit every input size (8x8 to 1x1, 32x32 to 8x8).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, width),
            conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            conv_bn_relu(2 * width, 4 * width),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)
