"""A plain (residual-free) VGG-style CNN for 32x32 images: three stages of two 3x3 convs at
widths w, 2w, 4w, each stage ending in a 2x2 max pool, then global average pooling and the
classifier. At w=32 it has about 290k weights and 38M MACs per image, as many MACs as small-cnn
spends, and reaches about 85% on CIFAR-10 with augmentation where small-cnn stays near 75%: the
plain net of the accuracy-against-latency benchmark (bench/pareto.py)."""

import torch
import torch.nn.functional as F
from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import register_model


class PlainCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float):
        super().__init__()
        # A real-valued width rounds per layer, so thin-dense can match a parameter budget closely.
        widths = [max(1, round(k * width)) for k in (1, 1, 2, 2, 4, 4)]
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        previous = in_channels
        for channels in widths:
            self.convs.append(nn.Conv2d(previous, channels, 3, padding=1, bias=False))  # BN supplies the bias
            self.norms.append(nn.BatchNorm2d(channels))
            previous = channels
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.relu(norm(conv(x)))
            if index % 2 == 1:  # the end of a stage
                x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("plain-cnn", first_conv="convs.0", classifier="fc", width="width")
def plain_cnn(*, num_classes: int, in_channels: int, image_size: int, width: float = 32) -> nn.Module:
    if width <= 0:
        raise UserError(f"model option width must be > 0, got {width}")
    return PlainCNN(num_classes, in_channels, width)
