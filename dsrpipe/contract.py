"""What a model file promises whoever deploys it, shared by training (config, data, export) and by
`predict`, which must run without training code: the largest input side, and the class-name rules."""

from __future__ import annotations

from .errors import UserError

MAX_IMAGE_SIZE = 1024  # the largest image side dsrpipe trains, and that a model may declare
MAX_CLASS_NAME = 256


def check_class_names(names, where: str, count: int | None = None) -> list[str]:
    """`names` if it is a list of `count` class names, each printable text without line breaks,
    1 to MAX_CLASS_NAME characters (predict writes one line per image, names included), else a
    one-line UserError that starts with `where` and quotes none of them. The one check for
    both ends: export, before anything is written, and predict, of the file it is given."""
    rule = f"printable text without line breaks, 1 to {MAX_CLASS_NAME} characters each"
    if not isinstance(names, list):
        raise UserError(
            f"{where}: class_names must be a list of names ({rule}), not a {type(names).__name__}"
        )
    for i, name in enumerate(names):
        if not (isinstance(name, str) and name.isprintable() and 0 < len(name) <= MAX_CLASS_NAME):
            raise UserError(
                f"{where}: class_names must be a list of names ({rule}); name {i} (counting from 0) is not"
            )
    if count is not None and len(names) != count:
        raise UserError(f"{where}: {len(names)} class_names for a model of {count} classes")
    return names
