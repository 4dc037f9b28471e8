"""Watching a pipelined run: TensorBoard event files of every stage (read back with the
tensorboard package's own reader, also across a resume), profiler traces of every stage with
the named ranges, the timeline picture and the comparison of runs."""
import json

import pytest

from launch import digest, launch, ok, records as read_records
from localloss_pp.cli import main

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from runargs import mlp_args

ARGS = ["train", *mlp_args(3, 64, "--epochs", "2", "--no-progress", "--tensorboard",
                           "--log-every", "8", quiet=False, one_thread=True)]


def scalars(folder):
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_tensorboard_profile_timeline_and_compare(tmp_path, capsys):
    run = tmp_path / "run"
    ok(launch(2, [*ARGS, "--run-dir", str(run), "--profile", "1:4:3"]))
    first, last = scalars(run / "tb" / "stage1"), scalars(run / "tb" / "stage2")
    # the first stage holds block 0 (its own numbers only); the last the rest and the globals
    assert "block00/train/loss" in first and "block00/test/error" in first
    assert "global/train/error" not in first and "stage1/train/busy_fraction" in first
    assert {"global/test/error", "global/train/loss_global", "global/lr",
            "block02/train/loss_sim", "stage2/train/wait_recv_s"} <= set(last)
    assert all([s for s, _ in v] == [1, 2] for v in (*first.values(), *last.values()))
    records = read_records(run, keep_timing=True)
    assert [v for _, v in last["global/test/error"]] == \
        pytest.approx([r["test"]["error"] for r in records])
    per_batch = scalars(run / "tb" / "stage2" / "batches")
    assert [s for s, _ in per_batch["global/train/error"]] == [8, 16, 24, 32, 40, 48, 56, 64]
    # profiler traces: one per stage, Chrome JSON with the stage's named ranges
    names = []
    for k in (1, 2):
        trace = json.loads((run / "profile" / f"stage{k}.json").read_text())
        names.append({e["name"] for e in trace["traceEvents"]
                      if e.get("name", "").startswith("localloss_pp.")})
    common = {"localloss_pp.forward", "localloss_pp.local_backward",
              "localloss_pp.optimizer_step", "localloss_pp.statistics"}
    assert common | {"localloss_pp.data", "localloss_pp.send"} <= names[0]
    assert common | {"localloss_pp.recv"} <= names[1]
    assert main(["timeline", str(run)]) == 0
    assert (run / "timeline.png").read_bytes()[:4] == b"\x89PNG"

    # resumed from the end of epoch 1 in place: the curves go on without duplicate steps
    ok(launch(2, [*ARGS, "--run-dir", str(run), "--resume",
                  str(run / "checkpoints" / "e00001-end")]))
    again = scalars(run / "tb" / "stage2")
    assert all([s for s, _ in v] == [1, 2] for v in again.values())
    assert again["global/test/error"] == last["global/test/error"]  # recomputed identically
    assert [s for s, _ in scalars(run / "tb" / "stage2" / "batches")["global/train/error"]] \
        == [8, 16, 24, 32, 40, 48, 56, 64]

    # the same job in one process: same digest, and compare says so
    one = tmp_path / "one"
    ok(launch(1, [*ARGS, "--run-dir", str(one)]))
    capsys.readouterr()
    assert main(["compare", str(run), str(one), "--plot", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert digest(run) == digest(one) and "model-digests: identical" in out
    assert "config: the same" in out and (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
