"""Export a pruned conv net to ONNX and check it the way a deployer would: onnxruntime only."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from dsrpipe.config import ValidateConfig
from dsrpipe.deploy import export as export_module
from dsrpipe.deploy.encoding import decoded_weights, encode_weights
from dsrpipe.deploy.export import IR_VERSION_FLOOR, export_onnx
from dsrpipe.deploy.predict import open_session
from dsrpipe.deploy.quantize import PORTABLE_MAX, check_portable_range, check_zeros_quantized, int8_weights
from dsrpipe.deploy.validate import agreeing, validate_onnx
from dsrpipe.errors import EXIT_VALIDATION, UserError, ValidationFailed
from dsrpipe.machine import CPU_FLAGS, cpu_features


class DigitsTestSet:
    """Stand-in for a dsrpipe Dataset's test split: sklearn's 8x8 digits, same `batches` API."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        self.pixels, self.labels = pixels[-360:], torch.tensor(digits.target[-360:])
        mean, std = pixels[:-360].mean().item(), pixels[:-360].std().item()
        self.info = SimpleNamespace(
            mean=[mean],
            std=[std],
            in_channels=1,
            image_size=8,
            class_names=[str(i) for i in range(10)],
            num_classes=10,
        )

    def batches(
        self, batch_size, shuffle=False, augment=False, seed=0, epoch=0, device="cpu", normalize=True
    ):
        assert not shuffle and not augment
        mean, std = self.info.mean[0], self.info.std[0]
        for start in range(0, len(self.labels), batch_size):
            x = self.pixels[start : start + batch_size]
            yield (
                ((x - mean) / std if normalize else x).to(device),
                self.labels[start : start + batch_size].to(device),
            )


def pruned_cnn(density: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(torch.rand_like(module.weight) < density)
            if isinstance(module, nn.BatchNorm2d):  # non-trivial stats, so BN folding changes weights
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def stored_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every weight in the file as the graph computes it, sparse and compact ones decoded."""
    return decoded_weights(proto)


@pytest.fixture(scope="module")
def test_set():
    return DigitsTestSet()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, test_set):
    model = pruned_cnn()
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    metadata = {"method": "dsr", "sparsity": "0.9", "class_names": json.dumps(test_set.info.class_names)}
    summary = export_onnx(
        model,
        path,
        in_channels=1,
        image_size=8,
        mean=test_set.info.mean,
        std=test_set.info.std,
        metadata=metadata,
    )
    return SimpleNamespace(model=model, path=path, summary=summary, metadata=metadata)


def run_onnx(path, pixels: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": pixels.numpy()})[0]


def test_file_is_valid_self_contained_onnx_with_metadata(exported):
    onnx.checker.check_model(str(exported.path), full_check=True)
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["model.onnx"]  # no external data
    proto = onnx.load(str(exported.path))
    props = {p.key: p.value for p in proto.metadata_props}
    assert exported.metadata.items() <= props.items()
    assert proto.producer_name == "dsrpipe"
    assert exported.model.training is False and not any(m.training for m in exported.model.modules())


@pytest.mark.parametrize("batch", [1, 37])
def test_onnx_matches_torch_on_raw_pixels(exported, test_set, batch):
    pixels = torch.rand(batch, 1, 8, 8)
    with torch.no_grad():
        expected = exported.model((pixels - test_set.info.mean[0]) / test_set.info.std[0]).numpy()
    np.testing.assert_allclose(run_onnx(exported.path, pixels), expected, atol=1e-4, rtol=0)


def test_pruned_weights_stay_exactly_zero(exported):
    stored = stored_weights(onnx.load(str(exported.path)))
    weights = {n: p for n, p in exported.model.named_parameters() if p.dim() > 1}
    for name, weight in weights.items():
        assert np.count_nonzero(stored[f"model.{name}"] == 0) == int((weight == 0).sum()), name
    assert exported.summary["zero_weights"] == sum(int((w == 0).sum()) for w in weights.values())


def export_as(model, path, test_set, **options):
    return export_onnx(
        model,
        path,
        in_channels=1,
        image_size=8,
        mean=test_set.info.mean,
        std=test_set.info.std,
        metadata={},
        **options,
    )


def optimized_ops(path, level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC) -> list[str]:
    """The op types onnxruntime runs after its graph optimisations: constant folding at the basic
    level, QDQ fusion at the extended one (all is the same plus hardware-specific layouts)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.optimized_model_filepath = str(path) + ".optimized"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.numerics
def test_encodings_shrink_the_file_without_changing_outputs(exported, tmp_path, test_set):
    summary = exported.summary
    assert summary["encoding"] == "compact" and summary["quantize"] == "none"
    assert summary["encoded_tensors"] == 2  # conv2 and the classifier; conv1 is too small
    dense = export_as(exported.model, tmp_path / "dense.onnx", test_set, encoding="dense")
    coo = export_as(exported.model, tmp_path / "coo.onnx", test_set, encoding="coo")
    assert dense["encoded_tensors"] == 0 and coo["encoded_tensors"] == 2
    assert dense["onnx_bytes"] == pytest.approx(summary["dense_onnx_bytes"], rel=0.01)
    assert summary["onnx_bytes"] < 0.7 * coo["onnx_bytes"] and coo["onnx_bytes"] < 0.5 * dense["onnx_bytes"]
    pixels = torch.rand(5, 1, 8, 8)
    expected = run_onnx(dense["path"], pixels)
    for path in (exported.path, coo["path"]):
        assert np.array_equal(run_onnx(path, pixels), expected)  # bit-identical, not merely close
        onnx.checker.check_model(str(path), full_check=True)
    assert {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}["encoding"] == "compact"


def test_onnxruntime_folds_the_decoder_at_session_creation(exported, tmp_path, test_set):
    dense = export_as(exported.model, tmp_path / "dense.onnx", test_set, encoding="dense")
    proto = onnx.load(str(exported.path))
    assert {"ScatterElements", "CumSum", "Gather"} <= {n.op_type for n in proto.graph.node}  # a decoder...
    used = {name for node in proto.graph.node for name in node.input}
    assert all(t.name in used for t in proto.graph.initializer)  # and no dead weight
    assert optimized_ops(exported.path) == optimized_ops(dense["path"])  # ...that is gone once loaded


@pytest.mark.parametrize("dtype", [np.float32, np.int8])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.1, 0.6, 1.0])
def test_compact_encoding_round_trips_any_pattern(tmp_path, dtype, density):
    """Each density picks another code width (8-bit with gaps over 255 bridged, 4, 2, 1 bit);
    zeros at either end, empty tensors and full ones come back exactly."""
    rng = np.random.default_rng(0)
    array = (rng.integers(1, 100, size=(40, 30, 3)) * (rng.random((40, 30, 3)) < density)).astype(dtype)
    array[0, 0, 0] = 0
    array[-1, -1, -1] = 7 * (density > 0)
    other = (rng.integers(-50, 50, size=(300,)) * (rng.random(300) < density)).astype(dtype)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Identity", ["w"], ["out_w"]),
            onnx.helper.make_node("Identity", ["v"], ["out_v"]),
        ],
        "g",
        [],
        [
            onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), a.shape
            )
            for n, a in (("out_w", array), ("out_v", other))
        ],
        [numpy_helper.from_array(array, "w"), numpy_helper.from_array(other, "v")],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    encoded = encode_weights(proto, "compact")
    assert encoded == (0 if density == 1.0 else 2)  # stored dense where coding would not pay
    onnx.checker.check_model(proto, full_check=True)
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    out_w, out_v = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {}
    )
    assert np.array_equal(out_w, array) and np.array_equal(out_v, other)
    assert np.array_equal(decoded_weights(proto)["w"], array)


def test_export_that_loses_a_zero_is_refused(monkeypatch, tmp_path, test_set):
    model = pruned_cnn()
    trace = export_module._trace_to_onnx

    def losing_a_zero(*args):
        proto = trace(*args)
        weight = next(t for t in proto.graph.initializer if t.name == "model.3.weight")
        array = numpy_helper.to_array(weight).copy()
        array.flat[np.flatnonzero(array == 0)[0]] = 1e-3
        weight.CopyFrom(numpy_helper.from_array(array, weight.name))
        return proto

    monkeypatch.setattr(export_module, "_trace_to_onnx", losing_a_zero)
    with pytest.raises(RuntimeError, match="lost zeros in 3.weight"):
        export_as(model, tmp_path / "model.onnx", test_set)
    assert not (tmp_path / "model.onnx").exists()


def test_int8_loss_of_a_zero_is_refused():
    fp32_weight = np.array([[0.0, 0.5], [0.25, 0.0]], dtype=np.float32)
    int8_weight = np.array([[0, 127], [64, 1]], dtype=np.int8)  # the last zero came back as 1

    def model(*initializers, nodes=()):
        graph = onnx.helper.make_graph(list(nodes), "g", [], [], list(initializers))
        return onnx.helper.make_model(graph)

    fp32 = model(numpy_helper.from_array(fp32_weight, "model.fc.weight"))
    dq = onnx.helper.make_node("DequantizeLinear", ["model.fc.weight_quantized", "s"], ["w"])
    scale = numpy_helper.from_array(np.array(0.004, dtype=np.float32), "s")
    with pytest.raises(RuntimeError, match="lost 1 zeros in model.fc.weight"):
        check_zeros_quantized(
            fp32, model(numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"), scale, nodes=[dq])
        )
    int8_weight[1, 1] = 0
    check_zeros_quantized(
        fp32, model(numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"), scale, nodes=[dq])
    )
    dq.input.append("zp")
    zero_point = numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")
    with pytest.raises(RuntimeError, match="non-zero zero point"):
        check_zeros_quantized(
            fp32,
            model(
                numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"),
                scale,
                zero_point,
                nodes=[dq],
            ),
        )
    # Per channel: one non-zero zero point among zeros is enough to lose that channel's zeros.
    per_channel = numpy_helper.from_array(np.array([0, 3], dtype=np.int8), "zp")
    with pytest.raises(RuntimeError, match="non-zero zero point"):
        check_zeros_quantized(
            fp32,
            model(
                numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"),
                scale,
                per_channel,
                nodes=[dq],
            ),
        )


def test_failed_export_leaves_previous_file_intact(tmp_path):
    class DataDependent(nn.Module):  # python control flow on tensor values: torch.export refuses it
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, x):
            return self.linear(x.flatten(1)) if x.sum().item() > 0 else -self.linear(x.flatten(1))

    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous model")
    model = DataDependent().train()
    with pytest.raises(UserError, match="cannot export DataDependent"):
        export_onnx(model, path, in_channels=1, image_size=8, mean=[0.0], std=[1.0], metadata={})
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temp file left behind
    assert model.training  # the caller's mode is restored


def test_a_numerical_tie_agrees_and_a_swap_or_a_nan_does_not():
    """Agreement of ONNX with torch, per image: the same class, or a swap within float32's noise
    (torch's top two 1e-8 apart); never a real swap, nor a NaN."""
    torch_logits = np.array([[1.0, 1.0 + 1e-8, 0.0], [1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [1.0, 2.0, 0.0]])
    onnx_logits = np.array([[1.0 + 2e-8, 1.0, 0.0], [2.0, 1.0, 0.0], [1.0, 2.0, 0.1], [np.nan, 2.0, 0.0]])
    assert agreeing(onnx_logits, torch_logits).tolist() == [True, False, True, False]
    # Past float32's noise, a swap however small: torch's top two 1e-4 apart.
    assert not agreeing(np.array([[1.0 + 1e-4, 1.0 + 1e-4 - 1e-6]]), np.array([[1.0, 1.0 + 1e-4]]))[0]


def test_validate_reports_agreement_and_enforces_thresholds(exported, test_set):
    report = validate_onnx(
        exported.path, exported.model, test_set, batch_size=100, latency_runs=20, threads=1
    )
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["onnx_top1"] == report["torch_top1"]
    assert report["num_test"] == 360 and report["threads"] == 1
    assert report["providers"] == ["CPUExecutionProvider"]
    assert set(report["latency_ms"]) == {"p50", "p95", "mean"}

    with pytest.raises(ValidationFailed, match="min_top1") as failure:
        validate_onnx(exported.path, exported.model, test_set, latency_runs=1, min_top1=1.01)
    assert failure.value.report["top1_agreement"] == 1.0


class OneLogitOff(nn.Module):
    """`model`, with logit 0 of the first sample of every batch moved by `delta`."""

    def __init__(self, model: nn.Module, delta: float):
        super().__init__()
        self.model, self.delta = model, delta

    def forward(self, x):
        out = self.model(x).clone()
        out[0, 0] += self.delta
        return out


class Negated(nn.Module):
    """`model` with its logits negated: its top-1 is the other model's least likely class."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return -self.model(x)


def test_validate_catches_one_corrupted_logit_of_one_sample(exported, test_set):
    """max_abs_diff is a max over every sample and logit: one logit of one sample per batch off
    by 0.5 fails a 0.01 bound (a mean over the 360 x 10 logits would be ~0.0003)."""
    with pytest.raises(ValidationFailed, match="max abs logit diff 0.5") as failure:
        validate_onnx(
            exported.path,
            OneLogitOff(exported.model, 0.5),
            test_set,
            batch_size=360,
            latency_runs=1,
            max_abs_diff=0.01,
        )
    assert abs(failure.value.report["max_abs_logit_diff"] - 0.5) < 1e-4


def test_int8_agreement_is_float32_against_torch(exported, test_set, tmp_path):
    """With a shipped model beside its float32 one, top1_agreement and max_abs_logit_diff compare
    the float32 model with torch: here the shipped one disagrees everywhere, the float32 nowhere."""
    shipped = export_as(Negated(exported.model), tmp_path / "shipped.onnx", test_set)["path"]
    report = validate_onnx(shipped, exported.model, test_set, fp32_path=exported.path, latency_runs=1)
    assert report["top1_agreement"] == 1.0 and report["max_abs_logit_diff"] < 1e-4
    assert report["int8_agreement"] < 1.0


def test_unreadable_onnx_is_a_user_error(exported, test_set, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    for path in (corrupt, tmp_path / "missing.onnx"):
        with pytest.raises(UserError, match=path.name):
            validate_onnx(path, exported.model, test_set)


# -- the quickstart model: size bounds, int8 -------------------------------------------------------


def digits_train_pixels() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().images[:-360, None] / 16.0).astype(np.float32)


def train_masked(model: nn.Module, test_set, steps: int = 50) -> nn.Module:
    """`model` trained on the digits training split with Adam, its zero weights held at zero."""
    from sklearn.datasets import load_digits

    masks = {n: p != 0 for n, p in model.named_parameters() if p.dim() > 1}
    x = (torch.tensor(digits_train_pixels()) - test_set.info.mean[0]) / test_set.info.std[0]
    y = torch.tensor(load_digits().target[:-360])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(y), (64,), generator=generator)
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in masks:
                    param.mul_(masks[name])
    return model.eval()


def sparse_small_cnn(**options) -> nn.Module:
    """small-cnn (the quickstart's model) with its two sparse convs pruned to exactly 90 %."""
    from dsrpipe.models import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, image_size=8, **options)
    with torch.no_grad():
        for name in ("conv2.weight", "conv3.weight"):
            weight = model.get_parameter(name)
            mask = torch.zeros(weight.numel(), dtype=torch.bool)
            mask[torch.randperm(weight.numel())[: weight.numel() // 10]] = True
            weight.mul_(mask.view_as(weight))
    return model.eval()


@pytest.fixture(scope="module")
def quickstart_like(tmp_path_factory, test_set):
    """The quickstart model at 90 %, exported dense, compact and int8 (calibrated on 300
    training digits). Untrained: the bytes depend on the shapes and the sparsity, not on training."""
    model = sparse_small_cnn()
    folder = tmp_path_factory.mktemp("quickstart")
    calibration = [digits_train_pixels()[i : i + 100] for i in range(0, 300, 100)]
    return SimpleNamespace(
        model=model,
        folder=folder,
        calibration=calibration,
        dense=export_as(model, folder / "dense.onnx", test_set, encoding="dense"),
        compact=export_as(model, folder / "compact.onnx", test_set),
        int8=export_as(
            model,
            folder / "int8.onnx",
            test_set,
            quantize="int8",
            calibration=calibration,
            fp32_path=folder / "int8.fp32.onnx",
        ),
    )


def test_every_file_declares_the_lowest_ir_version_its_opsets_need(quickstart_like):
    """onnxruntime 1.17 refuses a file declared IR 10 even where opset 18 needs only IR 8: dense,
    compact, int8 and its float32 file all declare the lowest version, within the documented floor."""
    files = [
        quickstart_like.dense,
        quickstart_like.compact,
        quickstart_like.int8,
        quickstart_like.int8["fp32"],
    ]
    for result in files:
        proto = onnx.load(result["path"])
        needed = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
        assert proto.ir_version == needed <= IR_VERSION_FLOOR == 8, result["path"]
        assert {o.domain: o.version for o in proto.opset_import}.get("", 0) <= 18


def test_size_bounds_at_90_percent_on_the_quickstart_model(quickstart_like):
    dense = quickstart_like.dense["onnx_bytes"]
    assert quickstart_like.compact["onnx_bytes"] <= 0.15 * dense
    assert quickstart_like.int8["onnx_bytes"] <= 0.06 * dense
    assert quickstart_like.int8["fp32"]["onnx_bytes"] == quickstart_like.compact["onnx_bytes"]


def test_int8_keeps_zeros_and_runs_integer_kernels(quickstart_like):
    int8 = stored_weights(onnx.load(quickstart_like.int8["path"]))
    for name, weight in quickstart_like.model.named_parameters():
        if weight.dim() > 1:
            quantized = int8[f"model.{name}_quantized"]
            assert quantized.dtype == np.int8 and not quantized[weight.detach().numpy() == 0].any(), name
    ops = optimized_ops(quickstart_like.int8["path"], ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
    assert "QLinearConv" in ops and "Conv" not in ops and "ScatterElements" not in ops
    # The classifier too: onnxruntime fuses its Gemm into QGemm only with its zero point kept.
    assert "QGemm" in ops and "Gemm" not in ops, ops
    props = {p.key: p.value for p in onnx.load(quickstart_like.int8["path"]).metadata_props}
    assert props["quantize"] == "int8" and props["encoding"] == "compact"
    fp32_props = {p.key: p.value for p in onnx.load(quickstart_like.int8["fp32"]["path"]).metadata_props}
    assert fp32_props["quantize"] == "none"


def test_portable_int8_weights_cannot_saturate_int16_and_full_range_ones_can(quickstart_like, test_set):
    """The default int8 weights lie in [-64, 64], so with u8 activations a pair of products is at
    most 2 * 255 * 64 = 32640 <= 32767: VPMADDUBSW (x86-64 without VNNI) never saturates. The
    same check must fail on a full-range export of the same model."""
    assert 2 * 255 * PORTABLE_MAX <= np.iinfo(np.int16).max < 2 * 255 * (PORTABLE_MAX + 1)
    portable = onnx.load(quickstart_like.int8["path"])  # compact-encoded: read decoded
    assert quickstart_like.int8["int8_range"] == "portable"
    assert {p.key: p.value for p in portable.metadata_props}["int8_range"] == "portable"
    weights = int8_weights(portable)
    assert {
        f"model.{n}_quantized" for n, p in quickstart_like.model.named_parameters() if p.dim() > 1
    } == set(weights)
    for name, weight in weights.items():
        # symmetric per channel: every channel's largest |w| maps to exactly 64, none beyond
        assert np.abs(weight.astype(np.int16)).max() == PORTABLE_MAX, name
    check_portable_range(portable)

    # The counter-case: full range, same model and calibration, fails the same check.
    folder = quickstart_like.folder
    full = export_as(
        quickstart_like.model,
        folder / "full.onnx",
        test_set,
        quantize="int8",
        int8_range="full",
        calibration=quickstart_like.calibration,
        fp32_path=folder / "full.fp32.onnx",
    )
    full_proto = onnx.load(full["path"])
    assert {p.key: p.value for p in full_proto.metadata_props}["int8_range"] == "full"
    full_weights = int8_weights(full_proto)
    assert set(full_weights) == set(weights)
    for name, weight in full_weights.items():
        assert np.abs(weight.astype(np.int16)).max() == 127, name
    with pytest.raises(RuntimeError, match=r"outside \[-64, 64\]"):
        check_portable_range(full_proto)
    with pytest.raises(ValueError, match="int8_range"):
        export_as(quickstart_like.model, folder / "x.onnx", test_set, quantize="int8", int8_range="7bit")


def test_the_portable_range_check_sees_minus_128():
    """-128, whose np.abs in int8 is -128 again: outside [-64, 64] like 65 is."""
    from onnx import TensorProto, helper

    def dequantized(weight):
        graph = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["w", "scale"], ["y"])],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, weight.shape)],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32(0.01), "scale")],
        )
        return helper.make_model(graph)

    check_portable_range(dequantized(np.array([[64, -64], [0, 1]], dtype=np.int8)))
    for outside in (-128, -65, 65, 127):
        with pytest.raises(RuntimeError, match=r"^1 int8 weights of w lie outside \[-64, 64\]"):
            check_portable_range(dequantized(np.array([[64, -64], [0, outside]], dtype=np.int8)))


def test_side_by_side_timing_alternates_who_goes_first(monkeypatch):
    """The shipped (a) and the dense (b) session take turns run by run, and turns about who
    goes first: a b b a a b b a, for the latency and the throughput runs alike."""
    from dsrpipe.deploy import validate

    calls = []

    class Session:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [SimpleNamespace(name="pixels")]

        def run(self, outputs, feed):
            calls.append((self.name, len(feed["pixels"])))

    monkeypatch.setattr(validate, "WARMUP_RUNS", 0)
    one, batch = np.zeros((1, 1, 8, 8), np.float32), np.zeros((64, 1, 8, 8), np.float32)
    validate._side_by_side(Session("a"), Session("b"), one, batch, latency_runs=4, throughput_runs=4)
    assert calls == [(name, n) for n in (1, 64) for name in "abbaabba"]


def test_several_models_are_timed_taking_turns(monkeypatch):
    """time_side_by_side (bench/pareto.py re-times a grid's exports with it): each file its own
    session, the sessions taking turns at batch 1 and then at batch 64, a figure per file."""
    from dsrpipe.deploy import validate

    calls = []

    class Session:
        def __init__(self, name):
            self.name = name

        def get_inputs(self):
            return [SimpleNamespace(name="pixels")]

        def run(self, outputs, feed):
            calls.append((self.name, len(feed["pixels"])))

    monkeypatch.setattr(validate, "WARMUP_RUNS", 0)
    monkeypatch.setattr(validate, "open_session", lambda path, threads, spinning: Session(str(path)))
    one = np.zeros((1, 3, 8, 8), np.float32)
    timed = validate.time_side_by_side(
        [Path("a"), Path("b"), Path("c")], one, latency_runs=2, throughput_runs=2, threads=1
    )
    assert calls == [(name, n) for n in (1, 64) for name in "abccba"]
    assert len(timed) == 3 and all(t["latency_ms"]["p50"] > 0 and t["images_per_s"] > 0 for t in timed)


def test_cpu_features_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n\n"
        "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    )
    cpu = cpu_features(cpuinfo)
    assert cpu["model_name"] == "Some CPU @ 2.0GHz"
    assert cpu["flags"] == {
        "avx2": True,
        "avx512f": True,
        "avx512_vnni": False,
        "avx_vnni": False,
        "amx_int8": False,
    }
    assert cpu["int32_dot"] is False  # no VNNI, no AMX: full-range int8 may saturate here
    cpuinfo.write_text(cpuinfo.read_text().replace("avx512bw", "avx512bw avx512_vnni"))
    assert cpu_features(cpuinfo)["int32_dot"] is True
    missing = cpu_features(tmp_path / "absent")  # not Linux: flags unknown, not guessed
    assert missing["flags"] is None and missing["int32_dot"] is None and "machine" in missing


@pytest.fixture(scope="module")
def trained(test_set, tmp_path_factory):
    """A narrower quickstart model at 90 %, trained a little on digits, exported to int8."""
    model = train_masked(sparse_small_cnn(width=16), test_set)
    folder = tmp_path_factory.mktemp("trained")
    calibration = [digits_train_pixels()[i : i + 100] for i in range(0, 300, 100)]
    return SimpleNamespace(
        model=model,
        folder=folder,
        int8=export_as(
            model,
            folder / "model.onnx",
            test_set,
            quantize="int8",
            calibration=calibration,
            fp32_path=folder / "model.fp32.onnx",
        ),
    )


def test_int8_stays_within_its_accuracy_delta_on_digits(trained, test_set):
    result = trained.int8
    report = validate_onnx(
        result["path"],
        trained.model,
        test_set,
        fp32_path=result["fp32"]["path"],
        latency_runs=5,
        min_top1=0.8,
        max_abs_diff=1e-3,
        min_agreement=0.99,
        max_top1_drop=ValidateConfig().max_top1_drop,
    )  # the default, stated in the README
    assert report["quantize"] == "int8" and report["fp32_onnx_top1"] >= 0.8
    assert report["int8_top1_drop"] <= 0.02 and report["int8_agreement"] >= 0.9
    assert report["onnx_top1"] == pytest.approx(report["fp32_onnx_top1"] - report["int8_top1_drop"])

    # The int8 gate's failing side: the shipped file is not the quantized fp32 model. min_top1
    # gates the shipped model too, not the float32 one, which here would pass it.
    other = export_as(pruned_cnn(), trained.folder / "other.onnx", test_set)
    with pytest.raises(ValidationFailed, match="max_top1_drop") as failure:
        validate_onnx(
            other["path"],
            trained.model,
            test_set,
            fp32_path=result["fp32"]["path"],
            latency_runs=1,
            max_top1_drop=0.01,
            min_top1=0.5,
        )
    shipped = failure.value.report
    assert shipped["int8_top1_drop"] > 0.5 and shipped["fp32_onnx_top1"] >= 0.8 > 0.5 > shipped["onnx_top1"]
    assert f"ONNX top-1 {shipped['onnx_top1']:.4f} is below min_top1 0.5" in str(failure.value)


# -- the validation gate's failing side ------------------------------------------------------------


def test_validation_refuses_another_models_file(trained, exported, test_set):
    """exported.path holds another (untrained) model of the same classes."""
    with pytest.raises(ValidationFailed, match="max_abs_diff .*min_agreement") as failure:
        validate_onnx(
            exported.path, trained.model, test_set, latency_runs=1, max_abs_diff=1e-2, min_agreement=0.99
        )
    assert failure.value.exit_code == EXIT_VALIDATION == 3
    assert failure.value.report["top1_agreement"] < 0.5


def test_validation_refuses_perturbed_weights(trained, test_set, tmp_path):
    result = trained.int8["fp32"]
    proto = onnx.load(result["path"])
    weights = decoded_weights(proto)
    fc = weights["model.fc.weight"] * np.float32(1.01)  # the dense classifier, 1 % off
    target = next(t for t in proto.graph.initializer if t.name == "model.fc.weight")
    target.CopyFrom(numpy_helper.from_array(fc, target.name))
    onnx.save(proto, tmp_path / "perturbed.onnx")
    validate_onnx(
        result["path"], trained.model, test_set, latency_runs=1, max_abs_diff=1e-3
    )  # the original passes
    with pytest.raises(ValidationFailed, match="max_abs_diff") as failure:
        validate_onnx(
            tmp_path / "perturbed.onnx",
            trained.model,
            test_set,
            latency_runs=1,
            max_abs_diff=1e-3,
            min_agreement=0.99,
        )
    assert failure.value.report["top1_agreement"] >= 0.99  # caught by the logits, not the labels


def test_validation_fails_a_model_whose_logits_are_nan(trained, test_set, tmp_path):
    """NaN in a trained model's BatchNorm statistics: every logit is NaN in torch and in
    onnxruntime, so they 'agree' on every sample and no threshold can see it; validate must."""
    model = copy.deepcopy(trained.model)
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        norm.running_var.fill_(float("nan"))
    nan_model = export_as(model, tmp_path / "nan.onnx", test_set)
    with pytest.raises(ValidationFailed, match="NaN or infinite logit from torch") as failure:
        validate_onnx(
            nan_model["path"], model, test_set, latency_runs=1, max_abs_diff=None, min_agreement=None
        )
    report = failure.value.report
    assert failure.value.exit_code == EXIT_VALIDATION
    assert report["nonfinite_samples"] == {"torch": report["num_test"], "onnx": report["num_test"]}
    assert report["max_abs_logit_diff"] == float("inf")  # a number, never lost to NaN
    # Only the torch side non-finite (the file holds the sound model): still refused, by both gates.
    with pytest.raises(ValidationFailed, match="from torch") as failure:
        validate_onnx(trained.int8["fp32"]["path"], model, test_set, latency_runs=1)
    assert failure.value.report["nonfinite_samples"]["onnx"] == 0


def test_validate_times_shipped_and_dense_side_by_side(quickstart_like, test_set, monkeypatch):
    opened = []

    def recording_open_session(*args, **kwargs):
        opened.append(open_session(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr("dsrpipe.deploy.validate.open_session", recording_open_session)
    report = validate_onnx(
        quickstart_like.compact["path"],
        quickstart_like.model,
        test_set,
        dense_path=quickstart_like.dense["path"],
        latency_runs=20,
        throughput_runs=3,
        threads=1,
    )
    assert report["size_ratio"] == report["onnx_bytes"] / report["dense_onnx_bytes"] <= 0.15
    for key in ("latency_ms", "dense_latency_ms"):
        assert 0 < report[key]["p50"] <= report[key]["p95"]
    assert report["throughput"]["batch"] == 64 and report["throughput"]["dense_images_per_s"] > 0
    assert report["speedup"]["latency_p50"] == report["dense_latency_ms"]["p50"] / report["latency_ms"]["p50"]
    assert report["speedup"]["throughput"] == (
        report["throughput"]["images_per_s"] / report["throughput"]["dense_images_per_s"]
    )
    assert report["encoding"] == "compact" and report["quantize"] == "none"
    # Both timed sessions sleep between runs: a spinning one would take a core from the other.
    assert len(opened) == 2
    for session in opened:
        options = session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    # what onnxruntime ran with, read from this machine
    assert report["onnxruntime"] == {"version": ort.__version__, "providers": ["CPUExecutionProvider"]}
    assert set(report["cpu"]) == {"model_name", "machine", "flags", "int32_dot"}
    if Path("/proc/cpuinfo").is_file():
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
        assert report["cpu"]["flags"] == {f: f in flags.split(":", 1)[1].split() for f in CPU_FLAGS}
