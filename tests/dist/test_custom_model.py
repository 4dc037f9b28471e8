"""A model defined outside the package (examples/custom_model.py), registered and trained
through the same command line, pipelined: the same digest on 1 and 2 stages."""
from launch import digest, launch, ok, records

ARGS = ["train", "--model-module", "examples.custom_model", "--model", "residual-mlp",
        "--num-layers", "3", "--num-hidden", "64", "--dropout", "0.1", "--dataset", "mnist5k",
        "--epochs", "1", "--threads-per-rank", "1", "--no-progress", "--no-print-stats"]


def test_own_model_pipelines_like_a_built_in_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    ok(launch(1, [*ARGS, "--run-dir", str(one)]))
    results = ok(launch(2, [*ARGS, "--run-dir", str(two)]))
    assert digest(one) == digest(two) and records(one) == records(two)
    assert "ResidualLinearUnit" not in results[0].stderr  # described like any unit
    assert "stage 1: blocks 0:Linear(784->64)" in results[0].stderr
