"""Checkpoints, resume (also with another number of stages), restarts and receive timeouts."""
import json
import os
import signal
import sys
import time

from launch import Ranks, Streamed, digest, launch

ARGS = ["--model", "mlp", "--dataset", "mnist5k", "--num-layers", "3", "--num-hidden", "64",
        "--dropout", "0.1", "--cutout", "--length", "8", "--epochs", "3",
        "--threads-per-rank", "1", "--no-progress", "--no-print-stats"]
TIMING = {"train_time_s", "epoch_time_s", "train_samples_per_s", "stages"}


def records(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in fh]


def ok(results):
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


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


def test_resume_auto_continues_an_interrupted_run_in_place(tmp_path):
    run = tmp_path / "run"
    ok(launch(2, ["train", *ARGS, "--epochs", "1", "--run-dir", str(run)]))
    ok(launch(2, ["train", *ARGS, "--run-dir", str(run), "--resume", "auto"]))
    ref = tmp_path / "ref"
    ok(launch(1, ["train", *ARGS, "--run-dir", str(ref)]))
    assert digest(run) == digest(ref) and records(run) == records(ref)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())][-1] == "e00003-end"
    assert len(list((run / "checkpoints").iterdir())) <= 3  # --keep-checkpoints default


def test_torchrun_restart_after_sigkill_resumes_by_itself(tmp_path):
    args = [*ARGS, "--num-hidden", "256", "--epochs", "4", "--checkpoint-every", "8"]
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--max-restarts", "1", "--nproc-per-node", "3", "-m", "localloss_pp", "train",
                  *args, "--run-dir", str(tmp_path / "r")])
    try:
        pid = int(s.wait_for(r"\[stage 2/3\] pid (\d+)", 90).group(1))
        s.wait_for(r"checkpoint e00002-s0000008 written", 180)
        os.kill(pid, signal.SIGKILL)  # mid-epoch 2
        rc = s.wait(300)
    finally:
        s.kill()
    assert rc == 0, s.text[-3000:]
    assert "resuming from" in s.text and "e00002-s00000" in s.text
    ref = tmp_path / "ref"
    ok(launch(1, ["train", *args, "--run-dir", str(ref)]))
    assert f"model-digest: {digest(ref)}" in s.text


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
