import pytest
import torch
from torch import nn

from dsrpipe import models
from dsrpipe.errors import UserError
from dsrpipe.models import create_model, is_known_model, list_models, register_model
from dsrpipe.sparse.layers import select_sparse_weights

DATASETS = {  # (in_channels, image_size, num_classes)
    "digits": (1, 8, 10),
    "mnist": (1, 28, 10),
    "cifar100": (3, 32, 100),
}


def _layers(model, kind):
    return [module for module in model.modules() if isinstance(module, kind)]


def assert_builds_and_follows_conventions(model, in_channels, image_size, num_classes):
    """Right output shape; the first Conv2d (Linear for MLPs) takes the input; the last Linear is the classifier."""
    first_layer = _layers(model, (nn.Conv2d, nn.Linear))[0]
    if isinstance(first_layer, nn.Conv2d):
        assert first_layer.in_channels == in_channels
    else:
        assert first_layer.in_features == in_channels * image_size**2
    classifier = _layers(model, nn.Linear)[-1]
    assert classifier.out_features == num_classes

    seen = []
    classifier.register_forward_hook(lambda module, args, output: seen.append(output))
    logits = model.eval()(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, num_classes)
    torch.testing.assert_close(logits, seen[0])  # nothing after the classifier


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", ["small-cnn", "lenet5", "lenet-300-100", "wrn-10-1", "wrn-16-2"])
def test_model_builds_for_dataset(name, dataset):
    in_channels, image_size, num_classes = DATASETS[dataset]
    if name == "lenet5" and image_size < 16:
        with pytest.raises(UserError, match="image_size >= 16"):
            create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        return
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    assert_builds_and_follows_conventions(model, in_channels, image_size, num_classes)


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_papers():
    wrn = create_model("wrn-28-2", num_classes=10, in_channels=3, image_size=32)
    assert _num_params(wrn) == 1_467_610  # "1.47M" in Mostafa & Wang 2019
    lenet5 = create_model("lenet5", num_classes=10, in_channels=1, image_size=28)
    assert _num_params(lenet5) == 431_080
    lenet_300_100 = create_model("lenet-300-100", num_classes=10, in_channels=1, image_size=28)
    assert _num_params(lenet_300_100) == 266_610
    # The paper's sparse layers, by the names reports and `sparsity.exclude` use.
    assert list(select_sparse_weights(lenet5)) == ["conv2", "fc1"]
    assert list(select_sparse_weights(lenet_300_100)) == ["fc1", "fc2"]


def test_small_cnn_width_and_wrn_dropout_options():
    narrow = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8)
    assert _layers(narrow, nn.Conv2d)[0].out_channels == 8
    wrn = create_model("wrn-10-1", num_classes=10, in_channels=3, image_size=32, dropout=0.3)
    assert {m.p for m in _layers(wrn, nn.Dropout)} == {0.3}


def test_resnet50_for_one_channel_small_images():
    model = create_model("resnet50", num_classes=10, in_channels=1, image_size=28)
    assert_builds_and_follows_conventions(model, 1, 28, 10)
    # CIFAR stem, torchvision's module names kept (pipelines select layers by them).
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert isinstance(model.fc, nn.Linear)
    assert isinstance(model.get_submodule("layer1.0.downsample.0"), nn.Conv2d)


def test_resnet_keeps_imagenet_stem_for_large_images():
    model = create_model("resnet18", num_classes=5, in_channels=1, image_size=224)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert_builds_and_follows_conventions(model, 1, 64, 5)  # global pooling: a smaller input still works


@pytest.mark.parametrize(("name", "in_channels"), [("mobilenet_v3_small", 1), ("googlenet", 3)])
def test_any_torchvision_classification_model_by_name(name, in_channels):
    image_size = 32 if name == "mobilenet_v3_small" else 64
    model = create_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    model.train()  # googlenet must return plain logits in training mode too (no auxiliary heads)
    assert model(torch.randn(2, in_channels, image_size, image_size)).shape == (2, 7)
    assert_builds_and_follows_conventions(model, in_channels, image_size, 7)


def test_names_known_and_listed():
    for name in [
        "small-cnn",
        "lenet5",
        "lenet-300-100",
        "wrn-28-2",
        "wrn-16-8",
        "resnet50",
        "mobilenet_v3_small",
    ]:
        assert is_known_model(name), name
    for name in ["xyz", "wrn-27-2", "wrn-28", "squeezenet1_0"]:
        assert not is_known_model(name), name
    names = list_models()
    assert {"small-cnn", "lenet5", "lenet-300-100", "resnet50", "mobilenet_v3_small"} <= set(names)
    assert len(names) == len(set(names))


def test_unknown_model_is_a_one_line_user_error():
    with pytest.raises(UserError, match="unknown model 'xyz'.*small-cnn.*torchvision") as raised:
        create_model("xyz", num_classes=10, in_channels=1, image_size=8)
    assert "\n" not in str(raised.value)
    with pytest.raises(UserError, match="did you mean 'resnet50'"):
        create_model("resnet5", num_classes=10, in_channels=1, image_size=8)


def test_bad_wrn_depth_explains_the_rule():
    with pytest.raises(UserError, match=r"6n\+4"):
        create_model("wrn-27-2", num_classes=10, in_channels=3, image_size=32)


@pytest.mark.parametrize("name", ["small-cnn", "wrn-10-1", "resnet18"])
def test_unexpected_option_is_a_user_error(name):
    with pytest.raises(UserError, match=f"bad options for model '{name}'.*'colour'"):
        create_model(name, num_classes=10, in_channels=3, image_size=32, colour="red")


def test_register_model(monkeypatch):
    monkeypatch.setattr(models, "_MODELS", dict(models._MODELS))  # keep the real registry clean

    @register_model("tiny-mlp")
    def tiny_mlp(*, num_classes, in_channels, image_size):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))

    assert is_known_model("tiny-mlp") and "tiny-mlp" in list_models()
    model = create_model("tiny-mlp", num_classes=3, in_channels=1, image_size=4)
    assert_builds_and_follows_conventions(model, 1, 4, 3)
