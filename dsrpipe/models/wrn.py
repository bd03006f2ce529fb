"""Wide ResNets for CIFAR (Zagoruyko & Komodakis 2016), named ``wrn-<depth>-<width>``, e.g. ``wrn-28-2``."""

import re

import torch
from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import register_model


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus a 1x1 shortcut conv when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False) if reshapes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preactivated = torch.relu(self.bn1(x))
        # As in the reference code, a shortcut conv sees the pre-activated input; an identity sees the raw one.
        shortcut = x if self.shortcut is None else self.shortcut(preactivated)
        out = self.conv1(preactivated)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


def _group(
    in_channels: int, out_channels: int, num_blocks: int, stride: int, dropout: float
) -> nn.Sequential:
    return nn.Sequential(
        PreActBlock(in_channels, out_channels, stride, dropout),
        *(PreActBlock(out_channels, out_channels, 1, dropout) for _ in range(num_blocks - 1)),
    )


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: float, num_classes: int, in_channels: int, dropout: float = 0.0):
        super().__init__()
        blocks_per_group = (depth - 4) // 6
        c1, c2, c3 = (max(1, round(c * width)) for c in (16, 32, 64))  # width may be fractional (thin-dense)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.group1 = _group(16, c1, blocks_per_group, 1, dropout)
        self.group2 = _group(c1, c2, blocks_per_group, 2, dropout)
        self.group3 = _group(c2, c3, blocks_per_group, 2, dropout)
        self.bn = nn.BatchNorm2d(c3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def parse_wrn_name(name: str) -> dict | None:
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if match is None:
        return None
    depth, width = map(int, match.groups())
    if depth < 10 or (depth - 4) % 6:
        raise UserError(
            f"bad model '{name}': a WRN's depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
        )
    if width < 1:
        raise UserError(f"bad model '{name}': a WRN's width must be >= 1")
    return {"depth": depth, "widen_factor": width}


# As in the DSR paper's WRN-28-2 runs, only the 3x3 convs of the residual blocks are sparse by default:
# the first conv, the 1x1 shortcut convs (few weights, each carrying a whole block's input) and the classifier
# stay dense.
@register_model(
    "wrn-<depth>-<width>",
    parse_name=parse_wrn_name,
    first_conv="conv1",
    classifier="fc",
    dense=("*.shortcut",),
    width="widen_factor",
)
def wide_resnet(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int,
    widen_factor: float,
    dropout: float = 0.0,
) -> nn.Module:
    # widen_factor: the name's width, or a real-valued one overriding it (group channels round(16k),
    # round(32k), round(64k)): thin-dense narrows it
    if widen_factor <= 0:
        raise UserError(f"model option widen_factor must be > 0, got {widen_factor}")
    return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)
