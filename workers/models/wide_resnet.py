"""WideResNet-34-10 (Zagoruyko and Komodakis 2016) as TRADES (Zhang et al. 2019) defines it in
its models/wideresnet.py: the network of TRADES, TRADES-AWP and most of RobustBench's CIFAR-10
entries. (Madry et al.'s PGD-AT used a wide ResNet of their own, which differs.)"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.models.preact_resnet import PreActBlock
from workers.models.registry import register_model


class WideResNet(nn.Module):
    """TRADES' WideResNet: its blocks are the pre-activation blocks of PreActResNet (the
    shortcut of a block that changes width or stride convolves the activated input), wider."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths[1:]):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)  # the 8x8 average pool of the original at 32x32
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.conv1(x))
        out = self.pool(F.relu(self.bn(out)))
        return self.fc(out.flatten(1))


@register_model("wrn_34_10")
def wrn_34_10(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(34, 10, num_classes=num_classes, in_channels=in_channels)
