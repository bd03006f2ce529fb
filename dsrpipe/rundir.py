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

Checkpoints are written and read by dsrpipe.checkpoint, never unpickling anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import files
from .checkpoint import load_checkpoint, read_finished_run
from .errors import UserError

if TYPE_CHECKING:  # the daemon clears run folders: it must not import the settings (and torch)
    from .config import Pipeline

MISSING, UNFINISHED, COMPLETE, STALE = "missing", "unfinished", "complete", "stale"

# Which settings each stage's outputs depend on: its own and everything upstream.
_TRAIN_SETTINGS = ("seed", "bf16", "data", "model", "sparsity", "train")
SETTINGS = {
    "train": _TRAIN_SETTINGS,
    "finetune": _TRAIN_SETTINGS + ("finetune",),
    "export": _TRAIN_SETTINGS + ("finetune", "export"),
    "validate": _TRAIN_SETTINGS + ("finetune", "export", "validation"),
}


def settings_fingerprint(cfg: Pipeline, stage: str) -> str:
    """A hash of the settings `stage`'s outputs depend on, to tell stale outputs apart."""
    chosen = {s: getattr(cfg, s) for s in SETTINGS[stage]}
    text = json.dumps(
        {s: v.model_dump(mode="json") if hasattr(v, "model_dump") else v for s, v in chosen.items()},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def shipped_stage(cfg: Pipeline) -> str:
    """The stage whose model is exported: the fine-tuned one if the pipeline fine-tunes."""
    return "finetune" if cfg.finetune.epochs else "train"


def training_stages(cfg: Pipeline) -> list[str]:
    """The stages that train, in order: train, and finetune if the pipeline fine-tunes."""
    return ["train"] + ["finetune"] * bool(cfg.finetune.epochs)


def stages(cfg: Pipeline) -> list[str]:
    return training_stages(cfg) + ["export", "validate"]


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
        # The checkpoints read so far, by path, with the file's identity when read: the stage
        # states, the fingerprints and the stages after training all read the same final.pt.
        self._checkpoints: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def stage_dir(self, stage: str) -> Path:
        return self.path / stage

    def last(self, stage: str) -> Path:
        return self.path / stage / "last.pt"

    def final(self, stage: str) -> Path:
        return self.path / stage / "final.pt"

    def read_checkpoint(self, path: Path) -> dict[str, Any]:
        """A checkpoint of the run (dsrpipe.checkpoint.load_checkpoint), read from disk once for
        as long as the file stays the same (checkpoints are replaced whole, never edited)."""
        try:
            status = path.stat()
        except OSError:
            return load_checkpoint(path)  # its one-line error
        identity = (status.st_ino, status.st_mtime_ns, status.st_size)
        known = self._checkpoints.get(path)
        if known is None or known[0] != identity:
            known = self._checkpoints[path] = (identity, load_checkpoint(path))
        return known[1]

    def forget_checkpoints(self) -> None:
        """Let go of the checkpoints read so far (a resumed stage holds their contents now)."""
        self._checkpoints.clear()

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

    # -- the state of the stages ------------------------------------------------------------------

    def fingerprint(self, stage: str, cfg: Pipeline) -> str | None:
        """The fingerprint `stage`'s output must carry to be current: the settings it depends on
        and the id of the output it is made from (None while that output is not there)."""
        settings = settings_fingerprint(cfg, stage)
        if stage == "train":
            if cfg.sparsity.source is None:
                return settings
            # A run that starts from another (frozen's masks, prune's dense weights) is stale once
            # that run is retrained.
            option, path = cfg.sparsity.source
            upstream = read_finished_run(path, option)["run_id"]
        elif stage in ("finetune", "export"):
            trained = self.final("train" if stage == "finetune" else shipped_stage(cfg))
            upstream = self.read_checkpoint(trained)["run_id"] if trained.exists() else None
        else:
            upstream = onnx_fingerprint(self.onnx)
        return None if upstream is None else f"{settings}-{upstream}"

    def state(self, stage: str, cfg: Pipeline) -> str:
        """MISSING; UNFINISHED (a last.pt to resume); COMPLETE; or STALE: made with other settings,
        or from an output that has changed since."""
        if stage in ("train", "finetune"):
            final, last = self.final(stage), self.last(stage)
            if final.exists():
                made, done = self.read_checkpoint(final)["fingerprint"], COMPLETE
            elif last.exists():
                made, done = self.read_checkpoint(last)["fingerprint"], UNFINISHED
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


# -- reading outputs -------------------------------------------------------------------------------


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
