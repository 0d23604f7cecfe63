"""PreActResNet-18 (He et al. 2016, "Identity Mappings"), the network of the PGD-AT recipe of
Rice et al. 2020 and of FGSM-RS (Wong et al. 2020), as in their train_cifar.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.registry import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, with the shortcut taken after the first BN-ReLU when it projects."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(
        self, blocks_per_stage: list[int], num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = 64
        for stage, num_blocks in enumerate(blocks_per_stage):
            planes = 64 * 2**stage
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(in_planes)
        # Global pooling: the 4x4 average pool of the original at 32x32, and any other size too.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.conv1(x))
        out = self.pool(F.relu(self.bn(out)))
        return self.linear(out.flatten(1))


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return PreActResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)
