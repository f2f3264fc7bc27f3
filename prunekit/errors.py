"""Shared by every module that reads files a user may have edited or damaged: library exceptions become
prunekit's one-line errors, and JSON is read strictly (UTF-8, no NaN, bounded nesting)."""
from __future__ import annotations

import json
from pathlib import Path

MAX_NESTING = 16  # deeper than any spec, recipe or record prunekit writes (a ResNet spec: 5 levels)


class FileFormatError(ValueError):
    """A file that cannot be read as the data it should hold; the message is a predicate ("is empty")
    that callers put after the file name."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's text squeezed onto one line (optionally shortened), for a message naming a file."""
    text = " ".join(str(error).split())
    return (text[:limit] if limit else text) or type(error).__name__


def nesting(value) -> int:
    """How many lists and mappings deep `value` goes (0 for a scalar), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            deepest = max(deepest, depth)
        elif depth >= MAX_NESTING:
            return depth + 1
        else:
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_nesting(value) -> None:
    if nesting(value) > MAX_NESTING:
        raise FileFormatError(f"is nested more than {MAX_NESTING} levels deep")


def utf8_text(path: str | Path) -> str:
    """A file's text; FileFormatError when it is unreadable or not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileFormatError("does not exist") from None
    except OSError as exc:
        raise FileFormatError(f"cannot be read ({exc.strerror or one_line(exc)})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"is not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None


def _no_constant(name: str):
    raise FileFormatError(f"holds {name} where a number belongs")


def read_json(path: str | Path):
    """A JSON file's data; FileFormatError (one line) when it is unreadable, not UTF-8, empty, not JSON,
    holds NaN or Infinity, or is nested deeper than MAX_NESTING."""
    text = utf8_text(path)
    if not text.strip():
        raise FileFormatError("is empty")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise FileFormatError(f"is nested more than {MAX_NESTING} levels deep") from None
    check_nesting(data)
    return data
