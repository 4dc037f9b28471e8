"""Helpers that start real multi-process runs of the command line (one process per stage)."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from localloss_pp.observe.metrics import read_jsonl
from localloss_pp.observe.record import EpochRecord

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(num_stages: int, args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `num_stages` processes of `python -m localloss_pp ...` wired as torchrun would
    (RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...); kill them all if they outlive `timeout`."""
    port = free_port()
    procs = []
    for rank in range(num_stages):
        env = _env(RANK=rank, WORLD_SIZE=num_stages, LOCAL_RANK=rank,
                   LOCAL_WORLD_SIZE=num_stages, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        if num_stages == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                env.pop(key)
        procs.append(subprocess.Popen([sys.executable, "-m", "localloss_pp", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=ROOT))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


class Streamed:
    """A process whose merged output is collected line by line while it runs."""

    def __init__(self, cmd: list[str], **env):
        self.proc = subprocess.Popen(cmd, env=_env(**env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} did not appear within {timeout}s:\n{self.text}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()
            self._reader.join(timeout=5)

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# the fields of a metrics record that are timings (they differ between equal runs)
TIMING = set(EpochRecord.varying())


def records(run_dir: Path, keep_timing: bool = False) -> list[dict]:
    """The metrics records of a run (read as `localloss-pp` reads them), timing fields left
    out unless `keep_timing`."""
    recs = read_jsonl(Path(run_dir) / "metrics.jsonl")
    if keep_timing:
        return recs
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in recs]


def ok(results: list[subprocess.CompletedProcess]) -> list[subprocess.CompletedProcess]:
    """`results` of `launch`, after asserting that every process succeeded."""
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def digest(run_dir: Path) -> str:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)["digest"]


class Ranks:
    """`num_stages` processes started like `launch`, left running; stderr goes to files."""

    def __init__(self, num_stages: int, args: list[str], log_dir: Path):
        port = free_port()
        self.logs = [Path(log_dir) / f"rank{r}.log" for r in range(num_stages)]
        self.procs = []
        for rank in range(num_stages):
            env = _env(RANK=rank, WORLD_SIZE=num_stages, LOCAL_RANK=rank,
                       LOCAL_WORLD_SIZE=num_stages, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            with open(self.logs[rank], "w") as fh:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "localloss_pp", *args], env=env, cwd=ROOT,
                    stdout=fh, stderr=subprocess.STDOUT))

    def text(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def wait_for(self, rank: int, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text(rank))
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not in rank {rank}'s output:\n{self.text(rank)}")

    def kill_all(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def spawn(target, world: int, args_of, timeout: float) -> list[int | None]:
    """Run `target(*args_of(rank))` in `world` spawned processes (a test's own stage function,
    with spies installed before it trains); their exit codes. A process still alive after
    `timeout` seconds is killed (exit code negative)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(rank)) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
