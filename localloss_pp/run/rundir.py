"""The run directory: checked and locked before anything is written; cleaned on resume.

One run at a time: the process that coordinates the run's files (the writer: the last stage of
replica 1, which writes metrics.jsonl, every checkpoint's manifest, the pruning and model.pt)
holds an exclusive `flock` on RUN_DIR/.lock for its whole life. The kernel releases it when the
process dies, however it dies, so a restarted attempt gets it at once, and a second run started
on the same directory is refused with the holder's host and pid. Files are created with the
user's umask (like every other program's files).
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from localloss_pp.run.checkpoint import MANIFEST, atomic_write_bytes, list_checkpoints

__all__ = ["LOCK_NAME", "LAUNCH_NAME", "read_launch_mark", "write_launch_mark", "RunDirLock",
           "release_locks", "clean_run_dir", "stop_with_parent"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
LAUNCH_NAME = ".launch"  # the launch that last started or continued the run here
_held: list["RunDirLock"] = []  # locks stay held (their descriptors open) until the process ends


def _forget_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the lock descriptors: a lock
    lives as long as any copy is open, and a worker may outlive a killed parent by seconds.
    Closing a copy never releases the parent's lock (only LOCK_UN or the last close does)."""
    for lock in _held:
        try:
            os.close(lock.fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunDirLock:
    """An exclusive lock on a run directory, created (with its parents) when missing."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        self.created = False

    def _check_and_create(self) -> None:
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise ValueError(f"run directory {d} is an existing file, not a directory; choose "
                             "another --run-dir")
        if not d.exists():
            try:
                d.mkdir(parents=True)
                self.created = True
            except (FileExistsError, NotADirectoryError):  # a part of the path is a file
                if not d.is_dir():
                    raise ValueError(f"run directory {d} cannot be created: a part of its path "
                                     "is a file; choose another --run-dir") from None
            except OSError as exc:
                fix = ("it is on a read-only file system: choose a --run-dir on a writable one"
                       if exc.errno == errno.EROFS else "choose a --run-dir on a writable file "
                       "system")
                raise ValueError(f"run directory {d} cannot be created "
                                 f"({exc.strerror or exc}); {fix}") from None
        if not os.access(d, os.W_OK | os.X_OK):
            if os.statvfs(d).f_flag & os.ST_RDONLY:
                raise ValueError(f"run directory {d} is on a read-only file system; choose a "
                                 "--run-dir on a writable one")
            raise ValueError(f"run directory {d} is not writable by this user; choose another "
                             "--run-dir or fix its permissions")

    def acquire(self, wait_s: float = 0.0) -> "RunDirLock":
        """Take the lock (waiting up to `wait_s` for a dying holder); a ValueError naming the
        holder when another live process has it."""
        import fcntl
        self._check_and_create()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise ValueError(f"cannot create the lock file {self.path} "
                                 f"({exc.strerror or exc}); choose a --run-dir on a writable "
                                 "file system") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ValueError(f"cannot lock {self.path} ({exc.strerror or exc}); the "
                                     "run directory's file system must support flock") from None
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise ValueError(f"run directory {self.run_dir} is in use by another run "
                                 f"({self._holder()}); wait for it to end, or choose another "
                                 "--run-dir") from None
            try:  # the file we locked must still be the one at the path (not unlinked)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "since": datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held.append(self)
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            return f"host {info['host']}, pid {info['pid']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def discard_if_unused(self) -> None:
        """After a failed start: remove the directory again if this run created it and wrote
        nothing but the lock there."""
        if self.fd is None or not self.created:
            return
        try:
            left = set(os.listdir(self.run_dir))
            if left <= {LOCK_NAME, LAUNCH_NAME}:
                for name in left:
                    (self.run_dir / name).unlink()
                self.run_dir.rmdir()
        except OSError:
            pass


def read_launch_mark(run_dir: Path) -> str | None:
    """The id of the launch that last started or continued the run in `run_dir` (None when
    no launch of this version has, or the mark is unreadable)."""
    try:
        return json.loads((Path(run_dir) / LAUNCH_NAME).read_text())["launch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_launch_mark(run_dir: Path, launch_id: str) -> None:
    """Mark the run in `run_dir` as this launch's, before it writes anything else there: a
    restarted attempt continues a run only when it carries its own launch's mark."""
    info = {"launch": launch_id, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now().isoformat(timespec="seconds")}
    atomic_write_bytes(Path(run_dir) / LAUNCH_NAME, (json.dumps(info) + "\n").encode())


def release_locks(failed: bool) -> None:
    """Release the run-directory locks this process holds (at the end of a run in this
    process; a process that dies releases them anyway). After a failed start, a directory the
    run created and left empty is removed."""
    while _held:
        lock = _held.pop()
        if failed:
            lock.discard_if_unused()
        os.close(lock.fd)
        lock.fd = None


def clean_run_dir(run_dir: Path) -> list[str]:
    """Remove what an interrupted run leaves behind: temporary files of atomic writes and
    checkpoint folders without a manifest (they never count; a resumed run writes them
    again). Returns what was removed. Only the lock holder calls this."""
    import shutil
    removed = []
    run_dir = Path(run_dir)
    folders = list_checkpoints(run_dir)
    for folder in [run_dir, *folders]:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(str(tmp.relative_to(run_dir)))
    for folder in folders:
        if not (folder / MANIFEST).exists():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder.relative_to(run_dir)) + "/")
    for probe in run_dir.glob(".shared-*"):
        probe.unlink(missing_ok=True)
    if removed:
        log.info("cleaned up after an interrupted run: %s", ", ".join(removed))
    return removed


def stop_with_parent() -> None:
    """Make this worker die with its parent (the torchrun agent): a worker whose agent was
    killed would otherwise run on in its own session, unseen, and keep writing the run
    directory. Linux: PR_SET_PDEATHSIG; elsewhere a thread that watches the parent pid."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            raise OSError(ctypes.get_errno(), "prctl")
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGKILL)
        return
    except (OSError, AttributeError):
        pass

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.error("the torchrun agent (pid %d) is gone: stopping this worker", parent)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
