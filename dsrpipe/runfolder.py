"""A run's folder, `<out>/<name>/`: its layout and its owner, torch-free (the watch daemon
removes what a killed job left and starts a run over with it; dsrpipe.rundir.RunDir adds the
state of the stages, which reads their checkpoints).

    <out>/<name>/
      run.lock                   held by the one dsrpipe process working on the run (its pid inside)
      train/  finetune/          each: last.pt (after every epoch), final.pt (stage complete), metrics.jsonl
      tensorboard/<stage>/       TensorBoard event files: metrics.jsonl's figures as scalars
      model.onnx  report.json    the exported model and how it measured
      model.fp32.onnx            with export.quantize: int8, the float32 model that model.onnx quantizes
      report.md  *.png           its pictures (dsrpipe.plots)
      tmp/                       a stage's own files while it runs (validate's dense reference model):
                                 removed when it ends, and by the run's next owner if it was killed
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import files
from .errors import UserError


class RunFolder:
    def __init__(self, out: str | Path, name: str):
        self.path = Path(out) / name
        self.onnx = self.path / "model.onnx"
        self.fp32_onnx = self.path / "model.fp32.onnx"
        self.report = self.path / "report.json"
        self.lock_file = self.path / "run.lock"
        # Not $TMPDIR: a process killed mid-stage (kill -9, watch's --job-timeout) left its files
        # there for good. Here the next owner of the run removes them, and so does the watch daemon.
        self.scratch = self.path / "tmp"

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def last(self, stage: str) -> Path:
        return self.path / stage / "last.pt"

    def final(self, stage: str) -> Path:
        return self.path / stage / "final.pt"

    def metrics(self, stage: str) -> Path:
        return self.path / stage / "metrics.jsonl"

    def write_history(self, stage: str, history: list[dict[str, Any]]) -> None:
        """A stage's metrics.jsonl: one JSON line per epoch."""
        files.write_text(self.metrics(stage), "".join(json.dumps(h) + "\n" for h in history))

    def history(self, stage: str) -> list[dict[str, Any]]:
        """A stage's metrics.jsonl (one dict per epoch); [] when the stage has not run."""
        path = self.metrics(stage)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def tensorboard(self, stage: str) -> Path:
        return self.path / "tensorboard" / stage

    # -- the owner --------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Own the run for the block: another dsrpipe process on the same run is refused, told
        which process holds it, instead of mixing its outputs with ours."""
        self.path.mkdir(parents=True, exist_ok=True)
        with files.holding_lock(self.lock_file, self._in_use):
            # What an owner that was killed left: nobody else's while we hold the run.
            shutil.rmtree(self.scratch, ignore_errors=True)
            yield

    def _in_use(self, pid: str) -> str:
        return (
            f"{self.path} is in use by another dsrpipe process (pid {pid}): wait for it to finish or stop it"
        )

    def sweep(self) -> None:
        """Remove tmp/ unless a process owns the run now (then it is that process's): what an
        owner that was killed left, for a caller that will not take the run (the watch daemon,
        after each job)."""
        if self.scratch.exists():
            try:
                with self.lock():
                    pass
            except UserError:  # owned, or no lock to be had: the next owner removes it
                pass

    @contextmanager
    def scratch_dir(self) -> Iterator[Path]:
        """tmp/ for the block's own files, removed after it however it ends (but kill -9)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        try:
            yield self.scratch
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def clear(self) -> None:
        """Remove every output of the run (its lock file stays, for whoever holds it): to start over."""
        for entry in self.path.iterdir() if self.path.is_dir() else []:
            if entry == self.lock_file:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
