"""Why validate times its two sessions with spinning off: one dense small-cnn (32x32) timed side by
side against itself, and against its compact-encoded twin, with onnxruntime's intra-op spinning on
(its default) and off. A fair measurement gives 1.00x for every pair.

    python bench/side_by_side_spin.py [--threads 2]

Writes bench/results/side_by_side_spin.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from dsrpipe import files
from dsrpipe.deploy.export import export_onnx
from dsrpipe.deploy.predict import open_session
from dsrpipe.deploy.validate import _side_by_side
from dsrpipe.models import create_model

OUT = Path(__file__).resolve().parent / "results" / "side_by_side_spin.json"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=3, image_size=32).eval()
    with torch.no_grad():  # element-sparse like DSR at 0.9: the compact encoding has zeros to skip
        for layer in (model.conv2, model.conv3):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.9)
    pixels = np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for encoding in ("dense", "compact"):
            paths[encoding] = Path(tmp) / f"{encoding}.onnx"
            export_onnx(
                model,
                paths[encoding],
                in_channels=3,
                image_size=32,
                mean=[0.5] * 3,
                std=[0.25] * 3,
                metadata={},
                encoding=encoding,
            )
        for spinning in (True, False):
            for timed, baseline in (
                ("dense", "dense"),
                ("compact", "compact"),
                ("compact", "dense"),
                ("dense", "compact"),
            ):
                sessions = [
                    open_session(paths[k], args.threads, spinning=spinning) for k in (timed, baseline)
                ]
                speed = _side_by_side(*sessions, pixels[:1], pixels, 300, 20)["speedup"]
                results.append({"spinning": spinning, "timed": timed, "against": baseline, **speed})
                print(
                    f"spinning {spinning!s:5}  {timed:7} against {baseline:7}  "
                    f"b1 {speed['latency_p50']:.2f}x  b64 {speed['throughput']:.2f}x"
                )
    files.write_json(OUT, {"threads": args.threads, "results": results})


if __name__ == "__main__":
    main()
