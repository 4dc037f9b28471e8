"""ResNets and Wide-ResNets pipelined: a stage boundary falls only between residual blocks, and
the invariant holds: the same digest and metrics on 1, 2, 3 and 4 stages (dropout on), across a
mid-epoch resume on another stage count, and for 2 stages x 2 replicas."""
import json

import pytest

from launch import digest, launch, ok, records

pytestmark = pytest.mark.slow  # about 2 minutes on 2 cores: `python -m pytest -m slow`

# tiny and quick on 2 CPU cores: 16 batches of 250 per epoch
RESNET = ["--model", "resnet18", "--dataset", "mnist5k", "--feat-mult", "0.03125",
          "--dropout", "0.1", "--dim-in-decoder", "256", "--batch-size", "250", "--epochs", "1"]
WRN = ["--model", "wresnet10-1", "--dataset", "mnist5k", "--feat-mult", "0.25",
       "--dropout", "0.1", "--dim-in-decoder", "256", "--batch-size", "250", "--epochs", "1"]
COMMON = ["--threads-per-rank", "1", "--no-progress", "--no-print-stats"]


def run(tmp_path, name, procs, args, *extra):
    run_dir = tmp_path / name
    ok(launch(procs, ["train", *args, *COMMON, "--run-dir", str(run_dir), *extra], timeout=300))
    return run_dir


@pytest.mark.parametrize("name,args", [("resnet", RESNET), ("wresnet", WRN)])
def test_residual_networks_equal_one_process_on_every_stage_count(tmp_path, name, args):
    ref = run(tmp_path, f"{name}-1", 1, args, "--checkpoint-every", "6")
    want = digest(ref), records(ref)
    for stages in (2, 3, 4):
        got = run(tmp_path, f"{name}-{stages}", stages, args)
        assert (digest(got), records(got)) == want, f"{stages} stages"
        part = json.loads((got / "partition.json").read_text())
        # stage boundaries between whole residual blocks (units), never inside one
        assert len(part["counts"]) == stages and sum(part["counts"]) == len(part["names"])
        assert all(n.startswith(("Stem", "BasicBlock", "WideBlock")) for n in part["names"])
    # a mid-epoch checkpoint of the one-process run, resumed on 3 stages
    resumed = run(tmp_path, f"{name}-resumed", 3, args, "--resume",
                  str(ref / "checkpoints" / "e00001-s0000006"))
    assert digest(resumed) == want[0] and records(resumed) == want[1]


def test_resnet_replicas_agree_on_every_stage_count(tmp_path):
    one = run(tmp_path, "s1r2", 2, RESNET, "--replicas", "2")
    two = run(tmp_path, "s2r2", 4, RESNET, "--replicas", "2")
    assert digest(one) == digest(two) and records(one) == records(two)
    assert records(two)[0]["replicas_identical"]
