"""One helper shared by every module that turns a library exception into prunekit's one-line errors."""
from __future__ import annotations


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's text squeezed onto one line (optionally shortened), for a message naming a file."""
    text = " ".join(str(error).split())
    return (text[:limit] if limit else text) or type(error).__name__
