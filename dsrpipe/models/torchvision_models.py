"""Any torchvision classification model by name, untrained, adapted to the dataset's channels and image size.

Module names stay torchvision's (``conv1``, ``layer1.0.downsample.0``, ``fc``): pipelines select layers by them.
"""

import functools

import torchvision
from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import input_size_refusal, register_model


@functools.cache
def classification_model_names() -> tuple[str, ...]:
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _builder_options(name: str, image_size: int) -> dict:
    if name in ("googlenet", "inception_v3"):
        # Otherwise they return (logits, aux logits...) in training mode; init_weights=True silences a FutureWarning.
        return {"aux_logits": False, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": image_size}  # a ViT's position embedding fixes its input size at build time
    return {}


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one taking ``in_channels``, same hyper-parameters otherwise, freshly initialised."""
    name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    parent_name, _, attribute = name.rpartition(".")
    replacement = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
    )  # fmt: skip
    setattr(model.get_submodule(parent_name), attribute, replacement)


def build_torchvision_model(
    *, name: str, num_classes: int, in_channels: int, image_size: int, **options
) -> nn.Module:
    try:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **_builder_options(name, image_size), **options
        )
    except TypeError as e:
        raise UserError(f"bad options for model '{name}': {e}") from None
    # A ViT whose patch size does not divide the side asserts so at build, before check's forward.
    except AssertionError as e:
        raise input_size_refusal(name, f"{in_channels}x{image_size}x{image_size}", str(e)) from None
    if isinstance(model, torchvision.models.ResNet) and image_size <= 64:
        # The usual CIFAR stem: ImageNet's 7x7/2 conv and 3x3/2 max pool would leave a 32x32 input 1x1 by
        # the last stage.
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, padding=1, bias=False)
        # As torchvision does
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


# The DSR paper's ImageNet runs kept the 1x1 downsample convs dense (and made the classifier sparse, which
# pipelines/imagenet-resnet50-dsr.yaml asks for with dense_last: false).
@register_model("resnet50", first_conv="conv1", classifier="fc", dense=("*.downsample.0",))
def resnet50(*, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
    return build_torchvision_model(
        name="resnet50", num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options
    )


# SqueezeNet classifies with a final 1x1 conv (classifier.1) and has no nn.Linear: named here, as
# the "last Linear is the classifier" convention would find none.
def _squeezenet(name: str):
    @register_model(name, first_conv="features.0", classifier="classifier.1")
    def build(*, num_classes: int, in_channels: int, image_size: int, **options) -> nn.Module:
        return build_torchvision_model(
            name=name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **options
        )


for _name in ("squeezenet1_0", "squeezenet1_1"):
    _squeezenet(_name)
