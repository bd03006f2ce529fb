"""The LeNet variants of the pruning literature (Han et al. 2015; Mostafa & Wang 2019), as in Caffe's MNIST example."""

from collections import OrderedDict

from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import register_model


@register_model("lenet5", first_conv="conv1", classifier="fc2", width="scale")
def lenet5(*, num_classes: int, in_channels: int, image_size: int, scale: float = 1.0) -> nn.Module:
    # Caffe's LeNet-5: no ReLU after the convolutions; 431,080 parameters on 28x28 MNIST.
    # `scale` multiplies the 20/50/500 channels (thin-dense baselines).
    feature_size = ((image_size - 4) // 2 - 4) // 2  # two unpadded 5x5 convs, each followed by a 2x2 max pool
    if feature_size < 1:
        raise UserError(f"model 'lenet5' needs image_size >= 16, got {image_size}")
    if scale <= 0:
        raise UserError(f"model option scale must be > 0, got {scale}")
    c1, c2, hidden = (max(1, round(c * scale)) for c in (20, 50, 500))
    # Named layers, so reports, plots and `sparsity.exclude` patterns speak of conv2 and fc1.
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(in_channels, c1, 5),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(c1, c2, 5),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(c2 * feature_size**2, hidden),
            relu=nn.ReLU(inplace=True),
            fc2=nn.Linear(hidden, num_classes),
        )
    )


@register_model("lenet-300-100", classifier="fc3")  # an MLP: its first Linear is sparse
def lenet_300_100(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            fc1=nn.Linear(in_channels * image_size**2, 300),
            relu1=nn.ReLU(inplace=True),
            fc2=nn.Linear(300, 100),
            relu2=nn.ReLU(inplace=True),
            fc3=nn.Linear(100, num_classes),
        )
    )
