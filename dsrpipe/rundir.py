"""A run's folder (dsrpipe.runfolder: its layout and its owner) and the state of its stages.

Every output records a fingerprint: the settings it was made with and the id of what it was made
from (the trained checkpoint's run id, the exported model's fingerprint). A stage is complete when
its output carries the fingerprint the current settings and upstream outputs call for; a stale
output is refused (`dsrpipe run`) or redone (`--force`, `compare`), never mixed in.

Checkpoints are written and read by dsrpipe.checkpoint, never unpickling anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx

from .checkpoint import load_checkpoint, read_finished_run
from .config import Pipeline  # the settings are handed in, never read from the YAML here
from .errors import UserError
from .report import Report
from .runfolder import RunFolder

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


class RunDir(RunFolder):
    """A run's folder, and the state of its stages: complete, unfinished, stale or missing."""

    def __init__(self, out: str | Path, name: str):
        super().__init__(out, name)
        # The checkpoints read so far, by path, with the file's identity when read: the stage
        # states, the fingerprints and the stages after training all read the same final.pt.
        self._checkpoints: dict[Path, tuple[tuple[int, int, int], dict[str, Any]]] = {}

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
            report = read_report(self.report)
            made, done = report.fingerprint if report is not None else None, COMPLETE
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
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return {}
    return {p.key: p.value for p in model.metadata_props}


def onnx_fingerprint(path: Path) -> str | None:
    """The fingerprint in an exported model's metadata; None if it is not there or not readable."""
    return onnx_metadata(path).get("fingerprint")


def read_report(path: Path) -> Report | None:
    """report.json's report; None if it is not there or not a report."""
    try:
        return Report.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None
