"""Which layers are sparse (models' declared defaults, a pipeline's override, explicit tensors) and
how the active weights are spread over them (uniform, ERK)."""

import pytest
import torch
from torch import nn

from dsrpipe.errors import UserError
from dsrpipe.models import create_model
from dsrpipe.sparse import DSR, LayerSelection, Sparsifier, layer_budgets


def wrn(name="wrn-16-2"):
    return create_model(name, num_classes=10, in_channels=3, image_size=32)


def test_wrn_keeps_first_conv_shortcuts_and_classifier_dense_by_default():
    model = wrn()
    sparse = LayerSelection().select(model)
    convs3x3 = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and n != "conv1"
    ]
    assert list(sparse) == convs3x3  # only the 3x3 convs of the residual blocks, as in the paper
    assert len(convs3x3) == 12 and all(n.endswith((".conv1", ".conv2")) for n in sparse)
    shortcuts = [n for n, m in model.named_modules() if n.endswith(".shortcut") and m is not None]
    assert shortcuts == ["group1.0.shortcut", "group2.0.shortcut", "group3.0.shortcut"]
    s = Sparsifier(model, sparsity=0.9)
    for name in shortcuts + ["conv1"]:
        assert bool((model.get_submodule(name).weight != 0).all())  # untouched
    assert set(s.masks) == set(convs3x3)
    # A pipeline can still override: exclude replaces the model's default list.
    assert set(LayerSelection(exclude=()).select(model)) == set(convs3x3) | set(shortcuts)
    assert "fc" in LayerSelection(dense_last=False).select(model)


def test_resnet50_keeps_its_downsample_convs_dense_by_default():
    with torch.device("meta"):
        model = create_model("resnet50", num_classes=1000, in_channels=3, image_size=224)
    sparse = LayerSelection(dense_last=False).select(model)  # the paper's ImageNet runs: FC sparse
    downsample = [n for n, m in model.named_modules() if n.endswith("downsample.0")]
    assert len(downsample) == 4 and not set(downsample) & set(sparse)
    assert "conv1" not in sparse and "fc" in sparse and "layer1.0.conv2" in sparse


def test_sparse_tensors_by_name_as_torch_ao_pruning_takes_them():
    model = wrn("wrn-10-2")
    chosen = ("group2.0.shortcut.weight", "group1.0.conv2.weight")
    assert list(LayerSelection(tensors=chosen).select(model)) == ["group1.0.conv2", "group2.0.shortcut"]
    with pytest.raises(UserError, match="'group1.0.bn1.weight' is no Conv2d/Linear weight"):
        LayerSelection(tensors=["group1.0.bn1.weight"]).select(model)
    with pytest.raises(UserError, match="not both"):
        LayerSelection(dense_first=False, tensors=chosen)


def test_a_model_without_declarations_keeps_its_first_conv_and_last_linear_dense():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2)
    )
    assert list(LayerSelection().select(net)) == ["1", "3"]
    mlp = create_model("lenet-300-100", num_classes=10, in_channels=1, image_size=28)
    assert list(LayerSelection().select(mlp)) == ["fc1", "fc2"]  # an MLP's first Linear is sparse


def erk_epsilon(shapes, budget, dense):
    """ε of Evci et al.'s ERK, the dense set given: the open tensors share what the dense ones leave."""
    numel = {n: torch.Size(s).numel() for n, s in shapes.items()}
    return (budget - sum(numel[n] for n in dense)) / sum(sum(s) for n, s in shapes.items() if n not in dense)


@pytest.mark.parametrize("sparsity", [0.9, 0.5])
def test_erk_densities_follow_the_formula_and_meet_the_budget_exactly(sparsity):
    model = wrn("wrn-10-2")
    weights = LayerSelection().select(model)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    numel = {n: w.numel() for n, w in weights.items()}
    budget = sum(max(1, round((1 - sparsity) * k)) for k in numel.values())  # what uniform keeps
    erk = layer_budgets(shapes, sparsity, "erk")
    assert sum(erk.values()) == budget  # exactly
    dense = {n for n in shapes if erk[n] == numel[n]}
    eps = erk_epsilon(shapes, budget, dense)
    for name, shape in shapes.items():
        if name in dense:  # capped at 1: the formula would give more
            assert eps * sum(shape) >= numel[name]
        else:  # density ε·(n_out + n_in + k_h + k_w) / (n_out·n_in·k_h·k_w), rounded
            assert abs(erk[name] - eps * sum(shape)) < 1
    if sparsity == 0.5:
        assert dense  # small layers saturate at 0.5 on this net: the rest is scaled up to compensate
    densities = {n: erk[n] / numel[n] for n in shapes}
    assert densities["group1.0.conv1"] > densities["group3.0.conv2"]  # small layers denser
    assert layer_budgets(shapes, sparsity, "uniform") == {
        n: max(1, round((1 - sparsity) * k)) for n, k in numel.items()
    }


def test_erk_masks_and_dense_layers_stay_out():
    torch.manual_seed(0)
    model = wrn("wrn-10-2")
    s = DSR(model, sparsity=0.9, distribution="erk", prune_target=100)
    assert {n: int(m.sum()) for n, m in s.masks.items()} == s.budgets
    assert "conv1" not in s.masks and "fc" not in s.masks and not any("shortcut" in n for n in s.masks)
    uniform = Sparsifier(wrn("wrn-10-2"), sparsity=0.9)
    assert s.active_count() == uniform.active_count()  # same parameter count, other spread
    assert len({round(m.float().mean().item(), 3) for m in s.masks.values()}) > 1
    with pytest.raises(UserError, match="unknown distribution"):
        Sparsifier(wrn("wrn-10-2"), distribution="gaussian")
