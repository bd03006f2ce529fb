"""A small, fast CNN: ~94k weights at the default width, so 90% sparsity still leaves a usable net,
yet an epoch over sklearn's 8x8 digits takes well under a second on a laptop CPU."""

from torch import nn

from dsrpipe.models import register_model


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),  # BN supplies the bias
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


@register_model("small-cnn")
def small_cnn(*, num_classes: int, in_channels: int, image_size: int, width: int = 32) -> nn.Module:
    # Only one downsampling step, so 8x8 inputs still leave a 4x4 map; global pooling makes any size work.
    return nn.Sequential(
        _conv_bn_relu(in_channels, width),
        _conv_bn_relu(width, 2 * width),
        nn.MaxPool2d(2),
        _conv_bn_relu(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
