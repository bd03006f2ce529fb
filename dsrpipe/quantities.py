"""Sizes and durations as people write them on a command line or in a config: 20G, 90m."""

from __future__ import annotations

import re

from .errors import UserError


def parse_size(text: str) -> int:
    """'500M', '20G', '1.5T' or a plain number of bytes (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read size '{text}' (e.g. 500M, 20G)")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def format_size(size: int) -> str:
    """Bytes as parse_size reads them: 2G, 1.5G, 600M."""
    for unit, power in (("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if size >= 1024**power:
            return f"{size / 1024**power:.3g}{unit}"
    return str(size)


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '2h', '1d' in seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text), re.IGNORECASE)
    if not match:
        raise UserError(f"cannot read duration '{text}' (e.g. 90s, 30m, 2h)")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2].lower()]
