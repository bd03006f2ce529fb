"""YAML as plain data, read safely: UTF-8 text only, no aliases, bounded size and nesting, and a
one-line error naming the file and line. Light (no torch, no pydantic): the watch daemon reads
drops with it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from . import files
from .errors import UserError

MAX_YAML_BYTES = 2**20
MAX_YAML_DEPTH = 20


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader without aliases (a few lines of `&a [*a, *a, ...]` expand to
    gigabytes once dumped or hashed), with bounded nesting (deep nesting overflows the stack),
    without tags (`!!float 1` is no number the file's reader can see) and without duplicate keys
    (the last would win, silently)."""

    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        mark = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", mark)
        if getattr(event, "tag", None) is not None:
            tag = event.tag.replace("tag:yaml.org,2002:", "!!")
            raise yaml.composer.ComposerError(None, None, f"tags are not allowed ({tag})", mark)
        if self.depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (str, int, float, bool)) or key is None:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key '{key}'", key_node.start_mark
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep)


NOT_QUOTED = "its text is not quoted: it is not a pipeline named on the command line or dropped"


# YAML 1.1 (PyYAML) reads 1e-3 as a string, which strict settings would refuse: read it as YAML 1.2 does.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(data: bytes | str, source: str, quote: bool = True) -> Any:
    """YAML (UTF-8 text, no aliases, nesting bounded) as plain data, or a one-line UserError
    naming `source` (and the line). Unless `quote`, the error repeats nothing the text holds:
    for a file nobody named as a pipeline, which may be any file this process can read."""
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise UserError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise UserError(f"{source}:{where} not valid YAML ({problem if quote else NOT_QUOTED})") from None
    except Exception as exc:  # what the constructors let through, e.g. a date that is no date
        problem = f"{type(exc).__name__}: {' '.join(str(exc).split())}" if quote else NOT_QUOTED
        raise UserError(f"{source}: not valid YAML ({problem})") from None


def read_yaml(path: Path, what: str, *, follow: bool = True, quote: bool = True) -> Any:
    """A YAML file's data (see `parse_yaml`), or a one-line UserError naming the file. It must be
    a regular file (a FIFO fails at once, see files.open_regular); `follow`: whether a final
    symbolic link is followed."""
    try:
        data = files.read_regular(path, what, MAX_YAML_BYTES, follow=follow)
    except FileNotFoundError:
        raise UserError(f"cannot read {what} {path}: No such file or directory") from None
    return parse_yaml(data, str(path), quote)
