"""Errors and their one-line form, shared by every part of the package (a leaf module)."""
from __future__ import annotations

import errno

__all__ = ["first_line", "os_error_line", "write_error_note", "ERROR_DIR_ENV"]

# what to do about the file-system errors a run can meet when it writes its files
_OS_FIX = {
    errno.ENOSPC: "free space on that file system",
    errno.EDQUOT: "free space within your quota on that file system",
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "this user may not write or read it: check its permissions",
    errno.EFBIG: "the file grew past the size limit of this process (ulimit -f) or of its file "
                 "system",
    errno.EIO: "the disk or network file system reported an I/O error: check it",
}


def os_error_line(exc: OSError) -> str:
    """One line for a file-system error: what failed, on which file, and what to do."""
    what = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    fix = _OS_FIX.get(exc.errno)
    return f"{what}{where}" + (f"; {fix}" if fix else "")


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type name when it has none): what a one-line
    error report shows (os_error_line for a file-system error of the run's own files)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# where a stage started by localloss_pp.train() leaves its one-line error for the caller
ERROR_DIR_ENV = "LOCALLOSS_PP_ERROR_DIR"


def write_error_note(rank: int, code: int, line: str) -> None:
    """Leave a stage's one-line error and exit code where localloss_pp.train() reads them
    (only when it started the stage: ERROR_DIR_ENV is set)."""
    import os
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        try:
            with open(os.path.join(folder, f"rank{rank}.txt"), "w") as fh:
                fh.write(f"{code} {line}")
        except OSError:
            pass
