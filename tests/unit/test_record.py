"""The epoch record (observe/record.py): what metrics.jsonl holds, written and read through one
type; its time fields derived from the type, not listed by hand."""
import json

import pytest

from localloss_pp.cli import main
from localloss_pp.observe.compare import compare_table, load_run
from localloss_pp.observe.record import BlockRecord, EpochRecord, SplitTotals
from runargs import mlp_args


def test_a_runs_records_round_trip_through_the_type(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *mlp_args(2, 32, "--epochs", "2"), "--run-dir", str(run)]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    for line in lines:
        raw = json.loads(line)
        rec = EpochRecord.from_json(raw)
        assert rec.to_json() == raw  # nothing lost, nothing added
        assert isinstance(rec.test, SplitTotals) and isinstance(rec.blocks[0], BlockRecord)
        assert sorted(rec.blocks[0].terms) == ["loss_pred", "loss_sim"]
        assert "replicas_identical" not in raw and rec.num_replicas == 1
    assert load_run(run)["records"][-1].epoch == 2
    assert any("| 2 |" in line for line in compare_table([load_run(run)]))


def test_the_time_fields_are_marked_on_the_type():
    assert EpochRecord.varying() == ("train_time_s", "epoch_time_s", "train_samples_per_s",
                                     "stages")
    with pytest.raises(ValueError, match="a metrics record of epoch 3 does not have the fields"):
        EpochRecord.from_json({"epoch": 3, "lr": 0.1, "train": {"error": 1.0}})
