"""A run's folder, `<out>/<name>/`: its layout, its checkpoints, the state of its stages, its owner.

    <out>/<name>/
      run.lock                   held by the one dsrpipe process working on the run (its pid inside)
      train/  finetune/          each: last.pt (after every epoch), final.pt (stage complete), metrics.jsonl
      tensorboard/<stage>/       TensorBoard event files: metrics.jsonl's figures as scalars
      model.onnx  report.json    the exported model and how it measured
      model.fp32.onnx            with export.quantize: int8, the float32 model that model.onnx quantizes
      report.md  *.png           its pictures (dsrpipe.plots)
      tmp/                       a stage's own files while it runs (validate's dense reference model):
                                 removed when it ends, and by the run's next owner if it was killed

Every output records a fingerprint: the settings it was made with and the id of what it was made
from (the trained checkpoint's run id, the exported model's fingerprint). A stage is complete when
its output carries the fingerprint the current settings and upstream outputs call for; a stale
output is refused (`dsrpipe run`) or redone (`--force`, `compare`), never mixed in.

Checkpoints hold only tensors and plain data (numbers, strings, lists, dicts) and are read with
`torch.load(weights_only=True)`: a file planted in an output folder or named by `masks_from` is
refused as "not a dsrpipe checkpoint", and nothing in it is ever executed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import files
from .config import EXPORT_SETTINGS, FINETUNE_SETTINGS, TRAIN_SETTINGS, VALIDATE_SETTINGS, Pipeline
from .errors import UserError
from .files import not_a_checkpoint

MISSING, UNFINISHED, COMPLETE, STALE = "missing", "unfinished", "complete", "stale"
SETTINGS = {
    "train": TRAIN_SETTINGS,
    "finetune": FINETUNE_SETTINGS,
    "export": EXPORT_SETTINGS,
    "validate": VALIDATE_SETTINGS,
}

CHECKPOINT_FORMAT = 2  # 1 (dsrpipe 0.1.0) pickled the RNG states: no longer read
CHECKPOINT_FIELDS = {
    "format": int,
    "stage": str,
    "complete": bool,
    "fingerprint": str,
    "run_id": str,
    "epoch": int,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "sparsifier": dict,
    "method": str,
    "rng": dict,
    "history": list,
    "model_spec": dict,
    "data_info": dict,
    "config": dict,
}


def shipped_stage(cfg: Pipeline) -> str:
    """The stage whose model is exported: the fine-tuned one if the pipeline fine-tunes."""
    return "finetune" if cfg.finetune.epochs else "train"


def stages(cfg: Pipeline) -> list[str]:
    return ["train"] + ["finetune"] * bool(cfg.finetune.epochs) + ["export", "validate"]


class RunDir:
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

    def tensorboard(self, stage: str) -> Path:
        return self.path / "tensorboard" / stage

    # -- the owner --------------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Own the run for the block: another dsrpipe process on the same run is refused, told
        which process holds it, instead of mixing its outputs with ours."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            held = files.exclusive_lock(self.lock_file)
        except OSError as exc:
            raise UserError(f"cannot lock {self.lock_file}: {exc.strerror or exc}") from None
        if held is None:
            pid = files.lock_holder(self.lock_file)
            raise UserError(
                f"{self.path} is in use by another dsrpipe process (pid {pid or '?'}): "
                "wait for it to finish or stop it"
            )
        try:
            # What an owner that was killed left: nobody else's while we hold the run.
            shutil.rmtree(self.scratch, ignore_errors=True)
            yield
        finally:
            held.truncate(0)  # no stale pid once released
            held.close()

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

    # -- the state of the stages ------------------------------------------------------------------

    def fingerprint(self, stage: str, cfg: Pipeline) -> str | None:
        """The fingerprint `stage`'s output must carry to be current: the settings it depends on
        and the id of the output it is made from (None while that output is not there)."""
        settings = cfg.fingerprint(*SETTINGS[stage])
        if stage == "train":
            if cfg.sparsity.source is None:
                return settings
            from .sparse.base import read_finished_run

            # A run that starts from another (frozen's masks, prune's dense weights) is stale once
            # that run is retrained.
            option, path = cfg.sparsity.source
            upstream = read_finished_run(path, option)["run_id"]
        elif stage in ("finetune", "export"):
            trained = self.final("train" if stage == "finetune" else shipped_stage(cfg))
            upstream = load_checkpoint(trained)["run_id"] if trained.exists() else None
        else:
            upstream = onnx_fingerprint(self.onnx)
        return None if upstream is None else f"{settings}-{upstream}"

    def state(self, stage: str, cfg: Pipeline) -> str:
        """MISSING; UNFINISHED (a last.pt to resume); COMPLETE; or STALE: made with other settings,
        or from an output that has changed since."""
        if stage in ("train", "finetune"):
            final, last = self.final(stage), self.last(stage)
            if final.exists():
                made, done = load_checkpoint(final)["fingerprint"], COMPLETE
            elif last.exists():
                made, done = load_checkpoint(last)["fingerprint"], UNFINISHED
            else:
                return MISSING
        elif stage == "export":
            if not self.onnx.exists():
                return MISSING
            made, done = onnx_fingerprint(self.onnx), COMPLETE
        else:
            if not self.report.exists():
                return MISSING
            made, done = read_report(self.report).get("fingerprint"), COMPLETE
        return done if made is not None and made == self.fingerprint(stage, cfg) else STALE

    def require(self, stage: str, cfg: Pipeline) -> None:
        """UserError unless `stage` (train, finetune or export), which a later stage builds on,
        is complete and current."""
        state = self.state(stage, cfg)
        command = {"train": "train-sparse"}.get(stage, stage)
        if state == STALE and stage == "export":
            raise UserError(f"{self.onnx} was exported from another model or with other settings: run export")
        if state == STALE:
            raise UserError(
                f"{self.stage_dir(stage)} holds a {stage} run made with other settings: "
                f"run {command} again with --force"
            )
        if state != COMPLETE:
            where = self.onnx if stage == "export" else self.final(stage)
            raise UserError(
                f"no {'exported' if stage == 'export' else 'trained'} model at {where}: run {command} first"
            )

    def is_complete(self, cfg: Pipeline) -> bool:
        """Whether every stage of `cfg` is complete and current, as `dsrpipe run` would find it
        (and skip it all): the question `compare` and `watch` ask of a run's folder."""
        try:
            return all(self.state(stage, cfg) == COMPLETE for stage in stages(cfg))
        except UserError:  # an output that is not ours, or masks_from gone: the run itself will say
            return False


# -- reading and writing outputs ------------------------------------------------------------------


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    files.torch_save(path, {"format": CHECKPOINT_FORMAT, **checkpoint})


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint dsrpipe wrote. Only tensors and plain data are unpickled, whatever the file
    holds, so loading runs no code; anything else is a one-line UserError."""
    path = Path(path)
    try:
        checkpoint = files.torch_load(path)
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # whatever a foreign, truncated or hostile file makes the loader raise
        raise not_a_checkpoint(path, exc) from None
    if not isinstance(checkpoint, dict):
        raise not_a_checkpoint(path, f"it holds a {type(checkpoint).__name__}, not a dict")
    wrong = [key for key, kind in CHECKPOINT_FIELDS.items() if not isinstance(checkpoint.get(key), kind)]
    if wrong:
        raise not_a_checkpoint(path, f"missing or malformed: {', '.join(wrong)}")
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise not_a_checkpoint(path, f"format {checkpoint['format']}, this dsrpipe reads {CHECKPOINT_FORMAT}")
    return checkpoint


@contextmanager
def restoring(path: Path) -> Iterator[None]:
    """Restore state from a loaded checkpoint: contents that do not fit where they go (a planted
    file with the right keys and the wrong insides) are refused like any foreign file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise not_a_checkpoint(path, exc) from None


def onnx_metadata(path: Path) -> dict[str, str]:
    """An exported model's metadata; {} if the file is not there or not readable."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    return {p.key: p.value for p in model.metadata_props}


def onnx_fingerprint(path: Path) -> str | None:
    """The fingerprint in an exported model's metadata; None if it is not there or not readable."""
    return onnx_metadata(path).get("fingerprint")


def read_report(path: Path) -> dict[str, Any]:
    """report.json's contents; {} if it is not there or not a JSON object."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}
