"""--snapshot-every: weight snapshots within epochs, evaluated afterwards in one process (time to
accuracy at sub-epoch resolution, benchmarks/tta.py)."""

import pytest
import torch

from launch import launch, ok, records
from localloss_pp.run.snapshots import SNAPSHOT_DIR, evaluate_run, read_points
from runargs import mlp_args

ARGS = ["train", *mlp_args(3, 64, "--epochs", "2", "--snapshot-every", "10", one_thread=True)]


def _check_curve(run, stages):
    curve = evaluate_run(run)
    # mnist5k: 4000 training images, batch 128 -> 32 batches; every 10th and the last
    assert [(p["epoch"], p["batch"]) for p in curve] == \
        [(e, b) for e in (1, 2) for b in (10, 20, 30, 32)]
    assert [p["step"] for p in curve] == [10, 20, 30, 32, 42, 52, 62, 64]
    times = [p["train_s"] for p in curve]
    assert all(0 < a < b for a, b in zip(times, times[1:]))
    # the snapshot after an epoch's last batch is the model the run evaluated at that epoch
    ends = [p for p in curve if p["batch"] == 32]
    assert [p["test_error"] for p in ends] == \
        pytest.approx([r["test"]["error"] for r in records(run)], abs=1e-9)
    assert ends[0]["test_error"] != curve[0]["test_error"]  # the weights change within epochs
    points = read_points(run)
    assert all(set(p["stage_s"]) == set(range(1, stages + 1)) for p in points)
    assert all(p["train_s"] == max(p["stage_s"].values()) for p in points)
    # training time only: the stamps stay below the epochs' training times plus set-up slack
    assert times[-1] <= sum(r["train_time_s"] for r in records(run, keep_timing=True)) + 1.0
    return curve


@pytest.mark.slow
def test_pipeline_snapshots_within_epochs(tmp_path):
    run = tmp_path / "run"
    ok(launch(3, [*ARGS, "--run-dir", str(run)]))
    names = sorted(p.name for p in (run / SNAPSHOT_DIR).iterdir())
    assert names == [f"stage{k}-e0000{e}.pt" for k in (1, 2, 3) for e in (1, 2)]
    _check_curve(run, 3)
    # the last point is the final model
    final = torch.load(run / "model.pt", weights_only=True)["units"]
    last = read_points(run)[-1]["states"]
    assert all(torch.equal(final[i][k], last[i][k]) for i in range(len(final))
               for k in final[i])

    # resumed in place from the end of epoch 1: epoch 2 is snapshotted again, its clock goes on
    # from epoch 1's, and the points are those of the first run (the same weights)
    first = evaluate_run(run)
    ok(launch(3, [*ARGS, "--run-dir", str(run), "--resume",
                  str(run / "checkpoints" / "e00001-end")]))
    again = _check_curve(run, 3)
    assert [p["test_error"] for p in again] == [p["test_error"] for p in first]
    assert again[:4] == first[:4]
    assert again[4]["train_s"] > again[3]["train_s"]


@pytest.mark.slow
def test_backprop_replicas_snapshot_once(tmp_path):
    """Global backprop over 2 data-parallel replicas: replica 1 writes, replica 2 does not."""
    run = tmp_path / "run"
    ok(launch(2, [*ARGS, "--backprop", "--replicas", "2", "--run-dir", str(run)]))
    names = sorted(p.name for p in (run / SNAPSHOT_DIR).iterdir())
    assert names == ["stage1-e00001.pt", "stage1-e00002.pt"]
    _check_curve(run, 1)


def test_without_snapshots_nothing_is_written_and_evaluation_says_why(tmp_path):
    run = tmp_path / "run"
    ok(launch(1, [*ARGS[:-2], "--epochs", "1", "--run-dir", str(run)]))
    assert not (run / SNAPSHOT_DIR).exists()
    with pytest.raises(FileNotFoundError, match="train with --snapshot-every N"):
        evaluate_run(run)
