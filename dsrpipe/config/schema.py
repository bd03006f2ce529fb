"""The building blocks of every settings section: the bounds, the strict base class and the
value types. Every value is bounded by what makes sense, so that no setting can make a run
allocate, loop or overflow absurdly later on."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, model_serializer

MAX_EPOCHS = 10_000
MAX_STEPS = 10**9  # iterations, and weights (prune_target)
MAX_BATCH = 4096
MAX_IMAGES = 10**8
MAX_WORKERS = 64
MAX_SEED = 2**32 - 1  # a 32-bit seed: what every RNG's seeding takes
MAX_LATENCY_RUNS = 10_000
MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 at least, whatever it is asked
MAX_LIST = 100  # milestones, rewire periods, exclude patterns
MAX_OPTIONS, MAX_OPTION_ITEMS, MAX_STRING = 32, 64, 256  # model.options
# Rates, strengths, factors, thresholds: bounded so that no product of them overflows float32 in
# training (train.lr=1e308 used to pass `check` and fail mid-run); far above any useful value.
MAX_FACTOR = 1e6


class SettingError(ValueError):
    """A rule between settings, broken: raised by a validator of a section (or of the pipeline),
    it names the setting to change, `where` (dotted, from that section), so that the error leads
    with it instead of with the section, or with "(top level)" (see loading.first_error)."""

    def __init__(self, where: str, message: str):
        super().__init__(message)
        self.where = where


class Section(BaseModel):
    # strict: a number is a number (`sparsity: false` is no 0.0, `epochs: true` no 1, "3" no 3);
    # an int is still taken where a float is expected (`lr: 1`).
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False, strict=True)
    # Options a class added later, by their defaults: left out of dumps at those, so that the
    # fingerprints of runs made before they existed stay current (each class lists its own).
    added_later: ClassVar[dict[str, Any]] = {}

    @model_serializer(mode="wrap")
    def _quiet_defaults(self, handler):
        data = handler(self)
        for cls in type(self).__mro__:
            for key, default in vars(cls).get("added_later", {}).items():
                if key in data and getattr(self, key) == default:
                    data.pop(key)
        return data


def _no_nul(path: Path) -> Path:
    if "\0" in str(path):
        raise ValueError("a path cannot contain a NUL character")
    return path


# An epoch as a mapping key: also its text, which is what a key becomes in JSON (a dumped config read back).
EpochKey = Annotated[int, Strict(False)]


def _path(value: Any) -> Any:
    return Path(value) if isinstance(value, str) else value  # strict mode takes only Path objects


FilePath = Annotated[Path, BeforeValidator(_path), AfterValidator(_no_nul)]
