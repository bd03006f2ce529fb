"""A small, fast CNN: ~94k weights at the default width, so 90% sparsity still leaves a usable net,
yet an epoch over sklearn's 8x8 digits takes well under a second on a laptop CPU."""

import torch
import torch.nn.functional as F
from torch import nn

from dsrpipe.models import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)  # BN supplies the bias
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        # Only one downsampling step, so 8x8 inputs still leave a 4x4 map; global pooling makes any size work.
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("small-cnn")
def small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)
