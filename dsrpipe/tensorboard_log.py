"""A training stage's figures as TensorBoard scalars: what metrics.jsonl holds, one point per
epoch (step = epoch), in <out>/<name>/tensorboard/<stage>/ (see dsrpipe.rundir)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

# tag -> the metrics.jsonl key it plots
SCALARS = {
    "loss/train": "train_loss",
    "loss/test": "test_loss",
    "top1/train": "train_top1",
    "top1/test": "test_top1",
    "lr": "lr",
    "sparsity/threshold_H": "threshold",
    "sparsity/pruned": "pruned",
    "sparsity/reallocations": "reallocations",
    "sparsity/active_params": "active_params",
    "sparsity/pruned_grown_share": "pruned_grown_share",
    "speed/images_per_second": "images_per_second",
    "cost/macs_per_sample": "macs",  # forward MACs of the model at the epoch's end (falls as it shrinks)
    "cost/mac_images": "mac_images",
    "cost/peak_rss_bytes": "peak_rss_bytes",
    "cost/peak_cuda_bytes": "peak_cuda_bytes",
}


class ScalarLog:
    """Event files written from the stage's history: the folder is rewritten from the history at
    the start (a resumed stage, or one started over, so that no epoch is ever there twice), then
    each epoch is added as it completes."""

    def __init__(self, folder: Path, history: list[dict[str, Any]]):
        shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(str(folder))
        for record in history:
            self.add(record)

    def add(self, record: dict[str, Any]) -> None:
        step = record["epoch"]
        for tag, key in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        if record.get("reallocations"):
            self.writer.add_scalar(
                "sparsity/pruned_per_reallocation", record["pruned"] / record["reallocations"], step
            )
        for layer, density in record["layer_density"].items():
            self.writer.add_scalar(f"layer_density/{layer}", density, step)
        for group, alive in (record.get("channels_alive") or {}).items():
            self.writer.add_scalar(f"channels_alive/{group}", alive, step)
        for event in record.get("shrinks") or []:  # each shrink at its iteration
            self.writer.add_scalar("shrink/macs_per_sample", event["macs_after"], event["iteration"])
            self.writer.add_scalar("shrink/params", event["params_after"], event["iteration"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
