"""A user's plug-ins: importing the module that registers models, objectives or datasets
(--model-module, --objective-module, --dataset-module) and installed packages' entry points,
with one-line errors."""
from __future__ import annotations

import importlib
import os
import sys

from localloss_pp.errors import first_line

__all__ = ["import_user_module", "load_entry_points"]


def import_user_module(path: str, flag: str, what: str, rule: str, example: str) -> None:
    """Import a user's module that registers something (--model-module, --objective-module); a
    one-line error naming `flag` if it cannot be imported."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules beside the run
    try:
        importlib.import_module(path)
    except SystemExit as exc:  # a script's sys.exit() run at import
        raise ValueError(f"{flag} {path}: importing it called sys.exit({exc.code!r}); "
                         f"{what} must {rule} at import") from None
    except Exception as exc:  # ImportError, or any error inside the user's module
        raise ValueError(f"{flag} {path}: cannot import it ({type(exc).__name__}: "
                         f"{first_line(exc)}); give an importable module path (on PYTHONPATH "
                         f"or installed), e.g. {example}") from None


def load_entry_points(group: str, what: str) -> None:
    """Load the entry points of `group` that installed packages declare (they register)."""
    from importlib.metadata import entry_points
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as exc:
            raise ValueError(f"the {what} entry point {ep.name} ({ep.value}) of an installed "
                             f"package cannot be loaded: {first_line(exc)}") from None
