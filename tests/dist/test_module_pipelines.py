"""Local modules and the literature's objectives pipelined: one process, 2 and 3 stages compute
the same bits with InfoPro, DGL and the paper's predsim under --local-modules on the CIFAR
ResNet, and a mid-epoch checkpoint of the one-process run resumes on 2 stages with the same
digest (docs/architecture.md, "The one invariant")."""
import json

import pytest

from launch import digest, launch, ok, records

# resnet32 (16 units) at 1/8 width on mnist5k: 16 batches of 250 per epoch
RESNET32 = ["--model", "resnet32", "--dataset", "mnist5k", "--feat-mult", "0.125",
            "--batch-size", "250", "--epochs", "1", "--lr", "2e-3", "--local-modules", "4",
            "--dropout", "0.1", "--threads-per-rank", "1", "--no-progress"]


def run(tmp_path, name, procs, objective, *extra):
    run_dir = tmp_path / name
    ok(launch(procs, ["train", *RESNET32, "--loss-sup", objective, "--run-dir", str(run_dir),
                      *extra], timeout=300))
    return run_dir


# infopro reads the network's input in every module (the first stage sends it along); dgl and
# predsim are the same path without it. The default suite runs the same two-stage equivalence
# in one process over in-memory links (tests/unit/test_stage.py); these are the real launches.
@pytest.mark.slow
@pytest.mark.parametrize("objective, stages", [("infopro", 2), ("dgl", 2), ("predsim", 2),
                                               ("infopro", 3), ("dgl", 3)])
def test_local_modules_equal_one_process_on_several_stages(tmp_path, objective, stages):
    ref = run(tmp_path, "one", 1, objective)
    want = digest(ref), records(ref)
    assert len(want[1][0]["blocks"]) == 3  # 4 modules: 3 with heads, the last one the output's
    many = run(tmp_path, "many", stages, objective)
    assert (digest(many), records(many)) == want
    part = json.loads((many / "partition.json").read_text())
    assert len(part["counts"]) == stages and sum(part["counts"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["infopro", "dgl"])
def test_a_mid_epoch_checkpoint_of_modules_resumes_on_two_stages(tmp_path, objective):
    ref = run(tmp_path, "one", 1, objective, "--checkpoint-every", "6")
    resumed = run(tmp_path, "resumed", 2, objective, "--resume",
                  str(ref / "checkpoints" / "e00001-s0000006"))
    assert digest(resumed) == digest(ref) and records(resumed) == records(ref)
