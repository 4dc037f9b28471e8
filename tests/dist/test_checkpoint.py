"""Checkpoints, resume (also with another number of stages) and receive timeouts. Restarts after
a SIGKILL at every phase of a run: test_faults.py."""
import json
import os
import signal
import time

import pytest

from launch import Ranks, digest, launch, ok, records
from runargs import mlp_args

ARGS = mlp_args(3, 64, "--dropout", "0.1", "--cutout", "--length", "8", "--epochs", "3",
                one_thread=True)


def test_resume_mid_epoch_and_at_epoch_end_with_other_stage_counts(tmp_path):
    full = tmp_path / "full"
    ok(launch(3, ["train", *ARGS, "--run-dir", str(full), "--checkpoint-every", "10",
                  "--keep-checkpoints", "100"]))
    names = sorted(p.name for p in (full / "checkpoints").iterdir())
    assert "e00001-end" in names and "e00002-s0000020" in names and "e00003-end" in names
    manifest = json.loads((full / "checkpoints" / "e00002-s0000020" / "manifest.json").read_text())
    assert manifest["epoch"] == 2 and manifest["step"] == 20 and manifest["partition"] == [1, 1, 1]
    assert set(manifest["files"]) == {"stage0.pt", "stage1.pt", "stage2.pt"}
    ref = records(full)
    # mid-epoch checkpoint of 3 stages, resumed on 2 stages
    mid = tmp_path / "mid"
    ok(launch(2, ["train", *ARGS, "--run-dir", str(mid), "--resume",
                  str(full / "checkpoints" / "e00002-s0000020")]))
    assert digest(mid) == digest(full)
    assert records(mid) == ref[1:]
    # end-of-epoch checkpoint, resumed in one process
    end = tmp_path / "end"
    ok(launch(1, ["train", *ARGS, "--run-dir", str(end), "--resume",
                  str(full / "checkpoints" / "e00001-end")]))
    assert digest(end) == digest(full) and records(end) == ref[1:]


@pytest.mark.slow
def test_a_vit_checkpointed_mid_epoch_in_one_process_resumes_on_three_stages(tmp_path):
    vit = ["--model", "vit-3-16-p7", "--dataset", "mnist5k", "--dropout", "0.1", "--epochs",
           "2", "--batch-size", "200", "--lr", "1e-3", "--threads-per-rank", "1",
           "--no-progress", "--no-print-stats"]
    full = tmp_path / "full"
    ok(launch(1, ["train", *vit, "--run-dir", str(full), "--checkpoint-every", "7",
                  "--keep-checkpoints", "100"]))
    mid = full / "checkpoints" / "e00001-s0000014"
    assert json.loads((mid / "manifest.json").read_text())["partition"] == [4]
    resumed = tmp_path / "resumed"
    ok(launch(3, ["train", *vit, "--run-dir", str(resumed), "--resume", str(mid)]))
    assert digest(resumed) == digest(full)
    assert records(resumed) == records(full)


@pytest.mark.slow
def test_resume_auto_continues_an_interrupted_run_in_place(tmp_path):
    run = tmp_path / "run"
    ok(launch(2, ["train", *ARGS, "--epochs", "1", "--run-dir", str(run)]))
    ok(launch(2, ["train", *ARGS, "--run-dir", str(run), "--resume", "auto"]))
    ref = tmp_path / "ref"
    ok(launch(1, ["train", *ARGS, "--run-dir", str(ref)]))
    assert digest(run) == digest(ref) and records(run) == records(ref)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())][-1] == "e00003-end"
    assert len(list((run / "checkpoints").iterdir())) <= 3  # --keep-checkpoints default


def test_receive_timeout_names_the_peer(tmp_path):
    ranks = Ranks(3, ["train", *ARGS, "--epochs", "50", "--timeout-s", "5", "--run-dir",
                      str(tmp_path / "r")], tmp_path)
    try:
        pid = int(ranks.wait_for(1, r"\[stage 2/3\] pid (\d+)", 90).group(1))
        ranks.wait_for(2, r"epoch 1/50", 120)
        os.kill(pid, signal.SIGSTOP)  # alive but silent: only a timeout can notice
        stopped = time.monotonic()
        for r in (0, 2):
            assert ranks.procs[r].wait(timeout=60) != 0
        assert time.monotonic() - stopped < 60
        text = ranks.text(0) + ranks.text(2)
        assert "lost stage 2/3 (rank 1)" in text
    finally:
        os.kill(pid, signal.SIGCONT)
        ranks.kill_all()
