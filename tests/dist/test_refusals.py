"""A refused run stays refused: torchrun's restarts (--max-restarts) never continue, finish or
overwrite a run the launch was refused, and only continue what their own launch started."""
import hashlib
import sys

import pytest

from launch import Streamed, launch, ok, records
from localloss_pp.run.rundir import RunDirLock, release_locks
from runargs import mlp_args

ARGS = mlp_args(2, 16, one_thread=True)


def torchrun(run_dir, *extra, restarts=1):
    return Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--max-restarts", str(restarts), "--nproc-per-node", "2",
                     "-m", "localloss_pp", "train", *ARGS, "--run-dir", str(run_dir), *extra])


def snapshot(run_dir):
    """Every file of a run directory (but its lock and launch mark) with its sha256."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()
            and p.name not in (".lock", ".launch")}


@pytest.mark.slow
def test_a_refused_run_stays_refused_in_every_attempt(tmp_path):
    """A finished 1-epoch run; a torchrun launch with --epochs 2 and no --resume is refused by
    its first attempt, and its restart must refuse too (it used to resume the run and rewrite
    model.pt, config.toml and metrics.jsonl, exit 0)."""
    run = tmp_path / "run"
    ok(launch(1, ["train", *ARGS, "--epochs", "1", "--run-dir", str(run)]))
    before = snapshot(run)
    s = torchrun(run, "--epochs", "2")
    rc = s.wait(180)
    assert rc != 0, s.text[-3000:]
    assert s.text.count("already holds a run") >= 2, s.text[-3000:]  # both attempts refuse
    assert "epoch 2" not in s.text
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_run_refused_for_another_runs_lock_never_finishes_it(tmp_path):
    """A launch on a run directory that another run holds (its lock) is refused; its restarts
    must not wait for the lock and then continue that run (they used to: --epochs 3 "finished"
    the other run, rewrote its model.pt and exited 0)."""
    run = tmp_path / "run"
    ok(launch(1, ["train", *ARGS, "--epochs", "1", "--run-dir", str(run)]))
    before = snapshot(run)
    holder = RunDirLock(run).acquire()  # the other run, still going
    try:
        second = torchrun(run, "--epochs", "3", restarts=3)
        second.wait_for("in use by another run", 120)
    finally:
        release_locks(failed=False)  # the other run ends: the directory is free again
    rc = second.wait(180)
    assert holder.fd is None
    assert rc != 0, second.text[-3000:]
    assert "epoch 2" not in second.text and "epoch 3" not in second.text, second.text[-3000:]
    assert snapshot(run) == before


@pytest.mark.slow
def test_a_one_process_torchrun_restart_still_continues_its_own_run(tmp_path):
    """The launch's own run is continued by its restart, also with one process (no process
    group, the agent's store all the same)."""
    run = tmp_path / "run"
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--max-restarts", "1", "--nproc-per-node", "1", "-m", "localloss_pp", "train",
                  *ARGS, "--epochs", "2", "--run-dir", str(run)],
                 LOCALLOSS_PP_FAULT="after-metrics-record:epoch=2")
    assert s.wait(180) == 0, s.text[-3000:]
    assert "fault point after-metrics-record reached" in s.text
    assert "resuming from" in s.text and "e00001-end" in s.text
    assert [r["epoch"] for r in records(run)] == [1, 2]
