"""A small, fast CNN: ~94k weights at the default width, so 90% sparsity still leaves a usable net,
yet an epoch over sklearn's 8x8 digits takes well under a second on a laptop CPU."""

import torch
import torch.nn.functional as F
from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import register_model


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float):
        super().__init__()
        # A real-valued width rounds per layer, so thin-dense can match a parameter budget closely.
        c1, c2, c3 = (max(1, round(k * width)) for k in (1, 2, 4))
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)  # BN supplies the bias
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        # Only one downsampling step, so 8x8 inputs still leave a 4x4 map; global pooling makes any size work.
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("small-cnn", first_conv="conv1", classifier="fc", width="width")
def small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: float = 32) -> nn.Module:
    if width <= 0:
        raise UserError(f"model option width must be > 0, got {width}")
    return SmallCNN(num_classes, in_channels, width)
