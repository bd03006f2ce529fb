"""Shrinking at export: dead filters leave the model, the logits stay, residual streams stay coupled."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn
from torchvision.models.resnet import BasicBlock

from dsrpipe.checkpoint import load_checkpoint, save_checkpoint
from dsrpipe.config import parse_pipeline
from dsrpipe.deploy import shrink
from dsrpipe.deploy.shrink import shrink_model
from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.pipeline import export_stage, validate_stage
from dsrpipe.rundir import RunDir
from dsrpipe.train import train_sparse


def with_trained_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Random BN affine parameters and running statistics from a few train-mode passes, so the
    constants a dead channel turns into are not the trivial ones; returned in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(4):
            model(torch.randn(16, *shape))
    return model.eval()


def kill(layer: nn.Module, *rows: int) -> None:
    with torch.no_grad():
        layer.weight[list(rows)] = 0


def set_constant(bn: nn.BatchNorm2d, channel: int, value: float) -> None:
    """Make what `bn` turns a zero input into, at `channel`, equal `value` (eval mode)."""
    with torch.no_grad():
        scale = bn.weight[channel] / torch.sqrt(bn.running_var[channel] + bn.eps)
        bn.bias[channel] = value + scale * bn.running_mean[channel]


def assert_same_logits(original: nn.Module, shrunk: nn.Module, shape: tuple[int, ...]) -> None:
    x = torch.randn(32, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected, got = original.eval()(x), shrunk(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), float((got - expected).abs().max())


def shrunk_checked(model: nn.Module, shape: tuple[int, ...]):
    before = copy.deepcopy(model.state_dict())
    shrunk, summary = shrink_model(model, shape)
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # the original is left as it was
    assert_same_logits(model, shrunk, shape)
    return shrunk, summary


def plain_cnn() -> nn.Module:
    """small-cnn (8/16/32 channels) with dead filters whose BN constants are zero after ReLU,
    positive into a padded 3x3 conv (merged into one that stays) and positive into the classifier."""
    model = with_trained_bn(
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8), (1, 8, 8)
    )
    kill(model.conv2, 1, 3, 5)
    set_constant(model.bn2, 1, 0.7)  # the largest positive constant: kept, stands in for channel 5
    set_constant(model.bn2, 3, -0.4)  # ReLU makes it 0: removed as is
    set_constant(model.bn2, 5, 0.3)  # merged into channel 1's weights in conv3
    kill(model.conv3, 0, 7)
    set_constant(model.bn3, 0, 0.9)  # pooled, then folded into the classifier's bias
    set_constant(model.bn3, 7, -0.2)
    return model


def test_plain_cnn_loses_its_dead_channels_and_keeps_its_logits():
    model = plain_cnn()
    shrunk, summary = shrunk_checked(model, (1, 8, 8))
    assert summary["removed_channels"] == {"conv2": 2, "conv3": 2}
    assert summary["folds"] == 2  # channel 5 merged into channel 1, channel 0 into the fc bias
    assert (shrunk.conv2.out_channels, shrunk.bn2.num_features, shrunk.conv3.in_channels) == (14, 14, 14)
    assert (shrunk.conv3.out_channels, shrunk.bn3.num_features, shrunk.fc.in_features) == (30, 30, 30)
    keep2 = [c for c in range(16) if c not in (3, 5)]
    assert torch.equal(shrunk.conv2.weight, model.conv2.weight[keep2])  # the kept filters are untouched
    assert not torch.equal(shrunk.fc.bias, model.fc.bias)  # channel 0's constant went into the bias
    assert summary["params_after"] < summary["params_before"]
    assert summary["macs_after"] < summary["macs_before"]


def test_a_layer_whose_channels_are_all_dead_keeps_one():
    """Every conv2 filter dead, every constant ReLU turns into 0: all of them could go, but a layer
    keeps one channel (its lowest), so the model still runs and gives the same logits."""
    model = with_trained_bn(
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8), (1, 8, 8)
    )
    kill(model.conv2, *range(16))
    for channel in range(16):
        set_constant(model.bn2, channel, -0.5)
    shrunk, summary = shrunk_checked(model, (1, 8, 8))
    assert summary["removed_channels"] == {"conv2": 15} and summary["folds"] == 0
    assert shrunk.conv2.out_channels == shrunk.conv3.in_channels == 1


def test_without_the_folds_the_safety_net_refuses(monkeypatch):
    """The folds are what keeps the plain CNN exact: skip them and shrinking must be refused."""
    monkeypatch.setattr(shrink, "_fold", lambda plan: None)
    with pytest.raises(UserError, match=r"shrinking changed the logits by .*export.shrink: false"):
        shrink_model(plain_cnn(), (1, 8, 8))


def test_safety_net_refuses_a_model_that_no_longer_runs():
    with pytest.raises(UserError, match="shrinking broke the model"):
        shrink._verify(nn.Linear(4, 2), nn.Linear(3, 2), torch.randn(2, 4), 1e-4)


def test_safety_net_refuses_one_corrupted_logit():
    """One logit of one sample off by 0.01 among 64 x 2: refused (the check is a max, not a mean)."""

    class OneOff(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(x).clone()
            out[5, 1] += 0.01
            return out

    torch.manual_seed(0)
    reference = nn.Linear(4, 2)
    with pytest.raises(UserError, match="shrinking changed the logits by 0.01"):
        shrink._verify(reference, OneOff(reference), torch.randn(64, 4) * 0.1, 1e-4)
    shrink._verify(reference, reference, torch.randn(64, 4), 1e-4)


def test_a_model_the_dependency_graph_cannot_trace_is_a_one_line_error(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator\nand pages of detail")

    monkeypatch.setattr(shrink.tp.DependencyGraph, "build_dependency", fail)
    with pytest.raises(
        UserError,
        match=r"^cannot shrink: the channel dependencies of SmallCNN could not be traced \(unsupported operator\); export without "
        r"shrinking \(export.shrink: false\)$",
    ):
        shrink_model(plain_cnn(), (1, 8, 8))


def test_a_zero_padded_conv_keeps_a_lone_positive_constant_channel():
    """One dead filter whose constant reaches a padded 3x3 conv non-zero: border pixels see the
    padding's zeros, not the constant, so no bias can stand in and there is nothing to merge into."""
    model = with_trained_bn(
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8), (1, 8, 8)
    )
    kill(model.conv1, 2)
    set_constant(model.bn1, 2, 0.5)
    shrunk, summary = shrunk_checked(model, (1, 8, 8))
    assert summary["removed_channels"] == {} and shrunk.conv2.in_channels == 8
    set_constant(model.bn1, 2, -0.5)
    assert shrink_model(model, (1, 8, 8))[1]["removed_channels"] == {"conv1": 1}


def test_a_channel_only_silent_on_the_probe_inputs_stays():
    """A live filter behind a very negative BN shift is 0 after ReLU for random inputs, yet not for
    every input: only filters that are zero decide what goes."""
    model = with_trained_bn(
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8), (1, 8, 8)
    )
    set_constant(model.bn1, 4, -1e3)
    kill(model.conv3, 0)  # a truly dead filter elsewhere, so there is something to shrink
    shrunk, summary = shrunk_checked(model, (1, 8, 8))
    assert summary["removed_channels"] == {"conv3": 1} and shrunk.conv1.out_channels == 8


def resnet_style() -> nn.Module:
    """A stem and two torchvision BasicBlocks: the first with a 1x1 downsample, the second an
    identity; both add into one 16-channel stream that the classifier reads."""
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 8, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(8),
            relu=nn.ReLU(),
            block1=BasicBlock(8, 16, 2, downsample),
            block2=BasicBlock(16, 16),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(16, 10),
        )
    )


def test_residual_channels_go_only_when_dead_in_every_branch():
    model = with_trained_bn(resnet_style(), (1, 8, 8))
    writers = (model.block1.conv2, model.block1.downsample[0], model.block2.conv2)
    for layer in writers:  # channel 2: dead in every branch of the stream
        kill(layer, 2)
    kill(model.block1.conv2, 4)  # dead in two of the three branches: the stream still carries them
    kill(model.block1.downsample[0], 5)
    kill(model.block2.conv2, 4, 5)
    # block2.conv1 reads the stream through a padded 3x3 conv: it must see 0 there...
    set_constant(model.block1.bn2, 2, -0.5)
    set_constant(model.block1.downsample[1], 2, 0.2)  # ...and it does: ReLU(-0.5 + 0.2) = 0
    set_constant(model.block2.bn2, 2, 0.6)  # while the classifier sees 0.6 after pooling: a bias fold
    shrunk, summary = shrunk_checked(model, (1, 8, 8))
    assert summary["removed_channels"] == {"block1.conv2": 1, "block1.downsample.0": 1, "block2.conv2": 1}
    assert shrunk.block2.conv1.in_channels == shrunk.fc.in_features == 15
    assert (
        shrunk.block1.bn2.num_features
        == shrunk.block1.downsample[1].num_features
        == shrunk.block2.bn2.num_features
        == 15
    )


class GatedStream(nn.Module):
    """Two producers add into one 4-channel stream that a Linear reads: `direct` (a 3x3 conv of
    the input) and `gated`, a 1x1 conv of ReLU(x - 10). A standard normal input never reaches
    10 (the probe and check batches of shrink_model are torch.randn), so on them the gated
    branch is its bias alone; an input brighter than 10 opens it."""

    def __init__(self):
        super().__init__()
        self.direct = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = nn.Conv2d(1, 1, 1)
        self.gated = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.gate.weight.fill_(1.0)
            self.gate.bias.fill_(-10.0)

    def forward(self, x):
        stream = self.direct(x) + self.gated(torch.relu(self.gate(x)))
        return self.fc(torch.relu(stream).mean((2, 3)))


def test_a_stream_channel_silent_on_the_probe_but_written_by_a_live_producer_stays():
    """Channel 2 of the stream: `direct`'s filter for it is zero, `gated`'s is not, yet on the
    random probe (and check) batch the gated branch is silent, so every consumer sees one
    constant there. Only a channel dead in *every* producer may go: with `any` producer in
    place of `all`, channel 2 would be folded into the classifier's bias, the safety net (random
    inputs too) would not see it, and on bright inputs the logits would change."""
    torch.manual_seed(0)
    model = GatedStream().eval()
    kill(model.direct, 2)
    with torch.no_grad():
        model.gated.weight[2] = 3.0  # live: bright pixels reach the stream through it
    shrunk, summary = shrunk_checked(model, (1, 6, 6))
    assert summary["removed_channels"] == {} and shrunk.direct.out_channels == shrunk.fc.in_features == 4
    bright = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(3)) * 4 + 9  # 9..13
    with torch.no_grad():
        expected, got = model(bright), shrunk(bright)
        assert not torch.allclose(model.gated(torch.relu(model.gate(bright)))[:, 2], model.gated.bias[2])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), float((got - expected).abs().max())


def test_wrn_preactivation_blocks():
    """WRN-10-2: inside a block conv1 -> BN -> ReLU -> conv2 (padded 3x3); between groups a stream
    written by conv2 and the 1x1 shortcut, read through BN -> ReLU by the next conv1 and shortcut."""
    model = with_trained_bn(create_model("wrn-10-2", num_classes=10, in_channels=3, image_size=8), (3, 8, 8))
    block1, block2, block3 = model.group1[0], model.group2[0], model.group3[0]
    kill(block1.conv1, 0, 1, 2, 3)
    for channel, value in zip(range(4), (0.8, -0.3, 0.4, -1.0)):  # two merged into one, two zero after ReLU
        set_constant(block1.bn2, channel, value)
    kill(block2.conv2, 7, 9)
    kill(block2.shortcut, 7, 10)  # only 7 is dead in both writers of the stream
    set_constant(block3.bn1, 7, -0.5)  # the padded conv1 of group 3 sees ReLU(-0.5) = 0; its shortcut too
    shrunk, summary = shrunk_checked(model, (3, 8, 8))
    assert summary["removed_channels"] == {"group1.0.conv1": 3, "group2.0.conv2": 1, "group2.0.shortcut": 1}
    assert shrunk.group1[0].conv2.in_channels == 29
    assert shrunk.group3[0].bn1.num_features == shrunk.group3[0].conv1.in_channels == 63


def test_lenet_linear_rows_and_biased_conv_filters():
    """LeNet-5's convs and fc1 have biases, so a dead filter or row is the constant bias: conv2's
    reaches fc1 through max pooling and flattening (16 inputs each), fc1's reaches fc2 through ReLU."""
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=10, in_channels=1, image_size=28).eval()
    kill(model.conv2, 3, 11)
    kill(model.fc1, *range(0, 500, 5))
    with torch.no_grad():
        model.fc1.bias[:50] = 0.3  # some dead rows pass ReLU
    shrunk, summary = shrunk_checked(model, (1, 28, 28))
    assert summary["removed_channels"] == {"conv2": 2, "fc1": 100}
    assert shrunk.fc1.in_features == 48 * 16 and shrunk.fc1.out_features == shrunk.fc2.in_features == 400


def test_a_model_without_dead_filters_comes_back_unchanged():
    model = with_trained_bn(
        create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, width=8), (1, 8, 8)
    )
    kill(model.fc, 3)  # a dead logit is still a logit
    shrunk, summary = shrunk_checked(model, (1, 8, 8))
    assert summary["removed_channels"] == {}
    assert (
        summary["params_after"] == summary["params_before"]
        and summary["macs_after"] == summary["macs_before"]
    )
    assert shrunk.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in shrunk.state_dict().items())


# -- end to end -------------------------------------------------------------------------------------


def onnx_weight_shapes(path) -> dict[str, list[int]]:
    """Shapes of the file's tensors, stored as initializers or as Constant nodes (dense or sparse)."""
    proto = onnx.load(str(path))
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        for attribute in node.attribute if node.op_type == "Constant" else ():
            if attribute.name == "value":
                shapes[node.output[0]] = list(numpy_helper.to_array(attribute.t).shape)
            elif attribute.name == "sparse_value":
                shapes[node.output[0]] = list(attribute.sparse_tensor.dims)
    return shapes


def test_pipeline_exports_the_shrunk_model_and_validates_it_against_the_trained_one(tmp_path):
    raw = {
        "name": "shrunk",
        "data": {"dataset": "digits"},
        "model": {"name": "small-cnn", "options": {"width": 8}},
        "sparsity": {"method": "dsr", "sparsity": 0.8, "prune_target": 50, "rewire_periods": {0: 5}},
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.1, "milestones": []},
        "finetune": {"epochs": 0},
        "validate": {"latency_runs": 5, "max_abs_diff": 1e-4},
        "export": {"encoding": "dense"},  # plain initializers under their torch names, to read the shapes
    }
    cfg = parse_pipeline(raw)
    final = train_sparse(cfg, tmp_path, progress=False)
    checkpoint = load_checkpoint(final)  # dead filters the short training did not make: by hand
    for name, rows in (("conv2.weight", [0, 3, 4, 9]), ("conv3.weight", [1, 2, 30])):
        checkpoint["model"][name][rows] = 0
    save_checkpoint(final, checkpoint)

    export_stage(cfg, tmp_path)
    report = validate_stage(cfg, tmp_path)
    shapes = onnx_weight_shapes(RunDir(tmp_path, "shrunk").onnx)
    assert shapes["model.conv2.weight"][0] < 16 and shapes["model.conv3.weight"][0] == 29
    assert report.passed and report.max_abs_logit_diff <= 1e-4  # ONNX (shrunk) vs torch (as trained)
    shrunk = report.shrink
    assert shrunk["removed_channels"]["conv3"] == 3 and shrunk["params_after"] < shrunk["params_before"]
    assert shrunk["params_before"] == report.total_params  # the report's sparsity is the trained model's
    meta = {p.key: p.value for p in onnx.load(str(RunDir(tmp_path, "shrunk").onnx)).metadata_props}
    assert json.loads(meta["shrink"]) == shrunk

    unshrunk = parse_pipeline({**raw, "export": {"encoding": "dense", "shrink": False}})
    export_stage(unshrunk, tmp_path)  # the same trained model: only the export is redone
    assert onnx_weight_shapes(RunDir(tmp_path, "shrunk").onnx)["model.conv3.weight"][0] == 32
    meta = {p.key: p.value for p in onnx.load(str(RunDir(tmp_path, "shrunk").onnx)).metadata_props}
    assert "shrink" not in meta
