"""Errors and their one-line form, shared by every part of the package (a leaf module)."""
from __future__ import annotations

__all__ = ["first_line"]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type name when it has none): what a one-line
    error report shows."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
