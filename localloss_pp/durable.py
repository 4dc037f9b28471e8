"""Durable writes: what a run has written survives a crash of the machine, not only of the
process (docs/checkpoints.md, "What survives a crash").

The rule durable stores follow: write the file, fsync it, rename it into place, then fsync the
directory that holds the name (a rename or a new file is an entry of its directory, and only
the directory's fsync makes the entry itself durable); a directory created on the way is an
entry of its parent, fsynced the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "make_dirs", "append_line"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (files created, renamed or removed) durable. A file
    system that cannot fsync a directory (some network mounts) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL: directories cannot be fsynced here
        pass
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p, with every directory it creates made durable in its parent."""
    path = Path(path)
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


def append_line(path: Path, line: str) -> None:
    """Append one line to a text file and make it durable before returning (a file created
    by the append is made durable in its directory too)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line if line.endswith("\n") else line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    if new:
        fsync_dir(path.parent)
