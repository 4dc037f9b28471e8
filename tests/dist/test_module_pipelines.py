"""Local modules and the literature's objectives pipelined: one process and 2 stages compute
the same bits with DGL and --local-modules on the CIFAR ResNet, and a mid-epoch checkpoint of
the one-process run resumes on 2 stages with the same digest
(docs/architecture.md, "The one invariant")."""
import json

import pytest

from launch import digest, launch, ok, records

# resnet32 (16 units) at 1/8 width on mnist5k: 16 batches of 250 per epoch
RESNET32 = ["--model", "resnet32", "--dataset", "mnist5k", "--feat-mult", "0.125",
            "--batch-size", "250", "--epochs", "1", "--lr", "2e-3"]
COMMON = ["--threads-per-rank", "1", "--no-progress"]


def run(tmp_path, name, procs, args, *extra):
    run_dir = tmp_path / name
    ok(launch(procs, ["train", *args, *COMMON, "--run-dir", str(run_dir), *extra], timeout=300))
    return run_dir


@pytest.mark.parametrize("objective", ["dgl", pytest.param("predsim", marks=pytest.mark.slow)])
def test_local_modules_equal_one_process_on_two_stages(tmp_path, objective):
    args = RESNET32 + ["--loss-sup", objective, "--local-modules", "4", "--dropout", "0.1"]
    ref = run(tmp_path, "one", 1, args, "--checkpoint-every", "6")
    want = digest(ref), records(ref)
    assert len(want[1][0]["blocks"]) == 3  # 4 modules: 3 with heads, the last one the output's
    two = run(tmp_path, "two", 2, args)
    assert (digest(two), records(two)) == want
    part = json.loads((two / "partition.json").read_text())
    assert len(part["counts"]) == 2 and sum(part["counts"]) == 3
    # the one-process run's mid-epoch checkpoint, resumed on two stages
    resumed = run(tmp_path, "resumed", 2, args, "--resume",
                  str(ref / "checkpoints" / "e00001-s0000006"))
    assert digest(resumed) == want[0] and records(resumed) == want[1]
