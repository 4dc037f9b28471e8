"""The two kill windows that lost work, the run-directory lock, and workers orphaned by a killed
torchrun agent."""
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import ROOT, Streamed, _env, digest, launch, ok, records
from localloss_pp.run.rundir import RunDirLock, release_locks
from runargs import mlp_args

ARGS = ["train", *mlp_args(2, 32, "--dropout", "0.1", "--epochs", "2", one_thread=True)]


@pytest.mark.slow
def test_killed_after_the_final_checkpoint_finishes_from_it(tmp_path):
    """Window 1: the final checkpoint is complete, model.pt was never written."""
    run = tmp_path / "run"
    ok(launch(2, [*ARGS, "--run-dir", str(run)]))
    want = digest(run)
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "model.pt").unlink()
    results = ok(launch(2, [*ARGS, "--run-dir", str(run), "--resume", "auto"]))
    assert f"model-digest: {want}" in results[1].stdout
    assert "final test error" in results[1].stdout
    assert digest(run) == want
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing recomputed


def _killed_before_first_manifest(run):
    """The state a kill leaves after epoch 1's metrics record, before its checkpoint's
    manifest: a record, the stages' parts without manifest, a temporary file."""
    folder = run / "checkpoints" / "e00001-end"
    (folder / "manifest.json").unlink()
    (folder / ".stage0.pt.x1y2z3.tmp").write_bytes(b"half a file")
    (run / "model.pt").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text(lines[0])


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_starts_again(tmp_path):
    """Window 2: no complete checkpoint, but the run directory holds this run's start."""
    ref = tmp_path / "ref"
    ok(launch(2, [*ARGS, "--run-dir", str(ref)]))
    run = tmp_path / "run"
    ok(launch(2, [*ARGS, "--epochs", "1", "--run-dir", str(run)]))
    _killed_before_first_manifest(run)
    # another run's configuration is still refused, and nothing is changed
    before = sorted(p.name for p in run.rglob("*"))
    other = launch(2, [*ARGS, "--num-hidden", "48", "--run-dir", str(run), "--resume", "auto"])
    for r in other:
        assert r.returncode == 2
        assert "holds another run (model.num_hidden: there 32, now 48)" in r.stderr
    assert sorted(p.name for p in run.rglob("*")) == before
    # the same run starts again from epoch 1 and ends as the uninterrupted one
    results = ok(launch(2, [*ARGS, "--run-dir", str(run), "--resume", "auto"]))
    assert "training again from epoch 1" in results[1].stderr
    assert digest(run) == digest(ref)
    assert records(run) == records(ref)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_a_second_run_in_a_locked_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    first = Streamed([sys.executable, "-m", "localloss_pp", *ARGS, "--epochs", "100",
                      "--run-dir", str(run)])
    try:
        first.wait_for(r"epoch 1/100", 120)
        before = (run / "metrics.jsonl").read_bytes()
        second = subprocess.run([sys.executable, "-m", "localloss_pp", *ARGS, "--epochs", "100",
                                 "--run-dir", str(run), "--resume", "auto"], env=_env(),
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in second.stderr
        assert f"run directory {run} is in use by another run" in err[0]
        assert f"pid {first.proc.pid}" in err[0] and "host " in err[0]
        assert (run / "metrics.jsonl").read_bytes()[:len(before)] == before
        assert first.proc.poll() is None  # the first run goes on
    finally:
        first.kill()
    # its holder dead, the lock is free (as soon as the kernel has closed its files)
    RunDirLock(run).acquire(wait_s=10)
    release_locks(False)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "\nState:\tZ" not in fh.read()
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_workers_stop_when_the_torchrun_agent_is_killed(tmp_path):
    run = tmp_path / "run"
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", "localloss_pp", *ARGS, "--epochs", "100",
                  "--run-dir", str(run)])
    try:
        pids = [int(s.wait_for(rf"\[stage {k}/2\] pid (\d+)", 90).group(1)) for k in (1, 2)]
        s.wait_for(r"epoch 1/100", 120)
        os.kill(s.proc.pid, signal.SIGKILL)  # the agent only; its workers have own sessions
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "workers outlived their torchrun agent"
    finally:
        for p in pids if "pids" in locals() else []:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        s.kill()
    RunDirLock(run).acquire(wait_s=10)  # nobody holds the run directory any more
    release_locks(False)
