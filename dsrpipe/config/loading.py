"""Reading a pipeline: its safe YAML (dsrpipe.safeyaml), `--set` overrides with method switching,
and one-line errors naming the setting."""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import UserError
from ..safeyaml import NOT_QUOTED, parse_yaml, read_yaml
from .methods import METHOD_OPTIONS, MethodOptions, switch_method
from .schema import SettingError
from .sections import Pipeline


def first_error(exc: ValidationError, quote: bool = True) -> tuple[str, str]:
    """(where, what) of a validation error, for a one-line message: the dotted path of the first
    problem ("" at the top level) and what is wrong, with a count of any others. Unless `quote`,
    nothing of the input is repeated: only setting names of the schema, and pydantic's own
    messages (which state the rule, not the value), never an unknown key or a message of ours."""
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, SettingError):  # a rule between settings: the one it names
        loc += cause.where.split(".")
    if first["type"] == "extra_forbidden":
        message = "unknown setting"
    elif first["type"] == "value_error" and not quote:
        message = "invalid value"
    else:
        message = first["msg"].removeprefix("Value error, ")
    if not quote:
        loc = [part if part in _setting_names() else "…" for part in loc]
        if first["type"] == "extra_forbidden":
            loc[-1:] = ["…"]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return ".".join(loc), f"{message}{more}"


def _setting_names() -> frozenset[str]:
    """Every setting name of the pipeline schema (its sections' fields, by the names files use)."""
    return frozenset(part for name, _ in _settings() for part in name.split("."))


def parse_pipeline(raw: Any, source: str = "pipeline", quote: bool = True) -> Pipeline:
    """The validated pipeline, or a one-line UserError (quoting nothing of `raw` unless `quote`)."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of settings at the top level")
    try:
        return Pipeline.model_validate(raw)
    except ValidationError as exc:
        where, what = first_error(exc, quote)
        raise UserError(
            f"{source}: {where or '(top level)'}: {what}{'' if quote else f' ({NOT_QUOTED})'}"
        ) from None


def _kinds(kind) -> list:
    """`kind` and the types it is made of (`X | None`, a union of sections, ...)."""
    return [kind, *(part for arg in typing.get_args(kind) for part in _kinds(arg))]


def _sections_in(kind) -> list[type[BaseModel]]:
    """The sections `kind` is made of; the sparsity section is that of every registered method."""
    found = [k for k in _kinds(kind) if isinstance(k, type) and issubclass(k, BaseModel)]
    if MethodOptions in found:
        found = [k for k in found if k is not MethodOptions] + list(METHOD_OPTIONS.values())
    return found


def _settings() -> tuple[tuple[str, Any], ...]:
    """(dotted name, type) of every setting of the pipeline schema, sections and their settings
    included: sparsity's are those of every method."""
    return _settings_of(tuple(METHOD_OPTIONS.values()))


@functools.cache
def _settings_of(methods: tuple[type[MethodOptions], ...]) -> tuple[tuple[str, Any], ...]:
    """_settings for these registered methods (a method registered later is another key)."""
    found, todo = {}, [(Pipeline, "")]
    while todo:
        model, prefix = todo.pop()
        for name, field in model.model_fields.items():
            dotted = prefix + (field.alias or name)
            found.setdefault(dotted, field.annotation)
            todo += [(section, dotted + ".") for section in _sections_in(field.annotation)]
    return tuple(found.items())


def path_settings() -> frozenset[str]:
    """The dotted names of the settings that are paths: data.root, sparsity.masks_from, ..."""
    return frozenset(name for name, kind in _settings() if Path in _kinds(kind))


def section_settings() -> frozenset[str]:
    """The dotted names of the settings that are sections of settings: train, sparsity,
    sparsity.remove_channels, ... (not a setting whose value is a mapping, like rewire_periods)."""
    return frozenset(name for name, kind in _settings() if _sections_in(kind))


def flat_settings(key: str, value: Any) -> Iterator[tuple[str, Any]]:
    """`key: value` as the single settings it sets: a mapping given for a section sets the keys
    it names, its own sections' too, and leaves the section's others as they are (`sparsity:
    {granularity: kernel}` is `sparsity.granularity: kernel`, not a sparsity section of one key)."""
    if isinstance(value, dict) and key in section_settings():
        for sub, sub_value in value.items():
            yield from flat_settings(f"{key}.{sub}", sub_value)
    else:
        yield key, value


def apply_overrides(raw: dict, overrides: list[str]) -> list[str]:
    """`section.key=value` settings from the command line, values read as YAML, applied to `raw`.
    A mapping given for a section is merged into it key by key (see flat_settings).

    An override of `sparsity.method` drops the file's sparsity options that the new method does
    not take (as `compare` does for a grid's base), so that `--set sparsity.method=static` just
    works; options given in the overrides themselves, and keys no method knows, stay for
    validation to name. Returns a note for each change the user did not spell out."""
    before = raw.get("sparsity")
    given: set[str] = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (e.g. data.root=/data), got '{item}'")
        for setting, setting_value in flat_settings(key.strip(), parse_yaml(value, f"--set {key}")):
            *parents, leaf = setting.split(".")
            node = raw
            for part in parents:
                if node.get(part) is None:  # a section left out, or null: its defaults
                    node[part] = {}
                node = node[part]
                if not isinstance(node, dict):
                    raise UserError(f"--set {key}: '{part}' is not a section")
            node[leaf] = setting_value
            if parents == ["sparsity"]:
                given.add(leaf)
    section = raw.get("sparsity")
    if "method" not in given or not isinstance(section, dict) or not isinstance(before, dict):
        return []
    method = section["method"]
    if not isinstance(method, str) or method not in METHOD_OPTIONS:
        return []  # validation names the unknown method
    kept = switch_method(section, method)
    dropped = [k for k in section if k not in kept and k not in given]
    raw["sparsity"] = section = {k: v for k, v in section.items() if k not in dropped}
    notes = []
    if dropped:
        notes.append(
            f"sparsity.method={method}: dropped the file's {', '.join(dropped)} ({method} takes no such option)"
        )
    keeps_every_weight = METHOD_OPTIONS[method].keeps_every_weight
    if keeps_every_weight and "sparsity" not in given and section.get("sparsity", 0) != 0:
        notes.append(
            f"sparsity.method={method}: keeps every weight, so sparsity {section['sparsity']} is now 0"
        )
        section["sparsity"] = 0.0
    return notes


def load_pipeline(
    path: str | Path,
    overrides: list[str] = (),
    quote: bool = True,
    note: Callable[[str], None] | None = None,
) -> Pipeline:
    """The pipeline file with its `--set` overrides, validated. `quote`: whether errors may repeat
    its text. `note` hears of what was adjusted or will not take effect (dropped options,
    milestones past the last epoch)."""
    path = Path(path)
    raw = read_yaml(path, "pipeline", quote=quote)
    notes = []
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)  # a pipeline is named after its file unless it says
        notes = apply_overrides(raw, list(overrides))
    cfg = parse_pipeline(raw, str(path), quote)
    for stage in ("train", "finetune"):
        options = getattr(cfg, stage)
        unreached = options.unreached_milestones()
        if unreached and options.epochs:
            notes.append(
                f"{stage}.milestones {unreached} are not reached in {options.epochs} epochs: "
                "the LR schedule never gets to them"
            )
    for message in notes if note else ():
        note(message)
    return cfg
