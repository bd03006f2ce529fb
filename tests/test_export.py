"""Export a pruned conv net to ONNX and check it the way a deployer would: onnxruntime only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from dsrpipe import export as export_module
from dsrpipe.encoding import decoded_weights, encode_weights
from dsrpipe.errors import EXIT_VALIDATION, UserError, ValidationFailed
from dsrpipe.export import export_onnx
from dsrpipe.quantize import check_zeros_quantized
from dsrpipe.validate import validate_onnx


class DigitsTestSet:
    """Stand-in for a dsrpipe Dataset's test split: sklearn's 8x8 digits, same `batches` API."""

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        self.pixels, self.labels = pixels[-360:], torch.tensor(digits.target[-360:])
        mean, std = pixels[:-360].mean().item(), pixels[:-360].std().item()
        self.info = SimpleNamespace(mean=[mean], std=[std], in_channels=1, image_size=8,
                                    class_names=[str(i) for i in range(10)], num_classes=10)

    def batches(self, batch_size, shuffle=False, augment=False, seed=0, epoch=0, device="cpu", normalize=True):
        assert not shuffle and not augment
        mean, std = self.info.mean[0], self.info.std[0]
        for start in range(0, len(self.labels), batch_size):
            x = self.pixels[start:start + batch_size]
            yield ((x - mean) / std if normalize else x).to(device), self.labels[start:start + batch_size].to(device)


def pruned_cnn(density: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
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
    summary = export_onnx(model, path, in_channels=1, image_size=8, mean=test_set.info.mean,
                          std=test_set.info.std, metadata=metadata)
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
    return export_onnx(model, path, in_channels=1, image_size=8, mean=test_set.info.mean, std=test_set.info.std,
                       metadata={}, **options)


def optimized_ops(path) -> list[str]:
    """The op types onnxruntime runs after its graph optimisations (constant folding included)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path) + ".optimized"
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sorted(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


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
    stored_ops = {n.op_type for n in onnx.load(str(exported.path)).graph.node}
    assert {"ScatterElements", "CumSum", "Gather"} <= stored_ops  # the file holds a decoder...
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
        [onnx.helper.make_node("Identity", ["w"], ["out_w"]), onnx.helper.make_node("Identity", ["v"], ["out_v"])],
        "g", [], [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), a.shape)
                  for n, a in (("out_w", array), ("out_v", other))],
        [numpy_helper.from_array(array, "w"), numpy_helper.from_array(other, "v")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    encoded = encode_weights(proto, "compact")
    assert encoded == (0 if density == 1.0 else 2)  # stored dense where coding would not pay
    onnx.checker.check_model(proto, full_check=True)
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    out_w, out_v = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {})
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
        check_zeros_quantized(fp32, model(numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"), scale,
                                          nodes=[dq]))
    int8_weight[1, 1] = 0
    check_zeros_quantized(fp32, model(numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"), scale,
                                      nodes=[dq]))
    dq.input.append("zp")
    zero_point = numpy_helper.from_array(np.array(3, dtype=np.int8), "zp")
    with pytest.raises(RuntimeError, match="non-zero zero point"):
        check_zeros_quantized(fp32, model(numpy_helper.from_array(int8_weight, "model.fc.weight_quantized"), scale,
                                          zero_point, nodes=[dq]))


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


def test_validate_reports_agreement_and_enforces_thresholds(exported, test_set):
    report = validate_onnx(exported.path, exported.model, test_set, batch_size=100, latency_runs=20, threads=1)
    assert report["top1_agreement"] == 1.0
    assert report["max_abs_logit_diff"] < 1e-4
    assert report["onnx_top1"] == report["torch_top1"]
    assert report["num_test"] == 360 and report["threads"] == 1
    assert report["providers"] == ["CPUExecutionProvider"]
    assert set(report["latency_ms"]) == {"p50", "p95", "mean"}

    with pytest.raises(ValidationFailed, match="min_top1") as failure:
        validate_onnx(exported.path, exported.model, test_set, latency_runs=1, min_top1=1.01)
    assert failure.value.report["top1_agreement"] == 1.0


def test_unreadable_onnx_is_a_user_error(exported, test_set, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    for path in (corrupt, tmp_path / "missing.onnx"):
        with pytest.raises(UserError, match=path.name):
            validate_onnx(path, exported.model, test_set)
