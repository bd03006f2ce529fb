"""Imported last by the watch daemon's fork server (dsrpipe.watch.runner.PRELOAD), never by the
daemon itself: one training step of a tiny net, its ONNX export and a drawn figure, so that what
torch, its exporter and matplotlib set up on first use (torch._dynamo, which SGD and torch.export
import lazily; the decomposition tables; the font cache) is paid once per daemon rather than once
per job. Each job forked from the server inherits it: bench/watch_warmup.py measures a digits job
at 0.63x its time without the warm-up (2 cores), for a server start about 3 s longer.

It runs on one thread: an OpenMP pool started in the server would not survive the fork."""

import io
import tempfile
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import nn

from ..deploy.export import export_onnx


def _warm_up() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 2)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.rand(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    with tempfile.TemporaryDirectory(prefix="dsrpipe-warmup-") as tmp:
        export_onnx(
            net, Path(tmp) / "warm.onnx", in_channels=1, image_size=8, mean=[0.5], std=[0.5], metadata={}
        )
    figure = Figure(figsize=(2, 2))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1])
    figure.colorbar(axes.imshow([[0, 1]]))
    figure.savefig(io.BytesIO(), format="png")


_threads = torch.get_num_threads()
torch.set_num_threads(1)
try:
    _warm_up()
except Exception:  # the server ignores only an ImportError; without the warm-up, each job sets up
    pass
finally:
    torch.set_num_threads(_threads)
