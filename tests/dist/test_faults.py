"""A kill at any phase boundary, of any process, loses nothing.

For every fault point of localloss_pp.faults.POINTS: a 2-stage run under
`torchrun --max-restarts 2`, one process SIGKILLed there in the first attempt, must exit 0 with
the digest and metrics records of the uninterrupted run and leave no temporary file."""
import sys

import pytest

from launch import Streamed, digest, records
from localloss_pp.faults import POINTS, parse_faults
from runargs import mlp_args

# 32 training batches per epoch: a checkpoint at batch 16 of every epoch and at its end, and
# only the newest one kept, so every epoch prunes
ARGS = mlp_args(2, 32, "--dropout", "0.1", "--epochs", "2", "--checkpoint-every", "16",
                "--keep-checkpoints", "1", one_thread=True)

# the fault armed for each point: which process dies where (rank 1 is the last stage, which
# writes metrics, manifests, pruning and model.pt)
FAULTS = {
    "setup": "setup:rank=0",
    "after-links": "after-links:rank=1",
    "mid-epoch": "mid-epoch:epoch=2:step=20:rank=0",
    "during-eval": "during-eval:epoch=1:rank=0",
    "after-metrics-record": "after-metrics-record:epoch=1:rank=1",
    "inside-stage-checkpoint": "inside-stage-checkpoint:epoch=2:rank=0",
    "before-manifest": "before-manifest:epoch=1:rank=1",
    "after-manifest": "after-manifest:epoch=2:step=16:rank=1",
    "during-pruning": "during-pruning:epoch=2:rank=1",
    "before-model": "before-model:rank=1",
    "after-model": "after-model:rank=1",
}


def test_every_fault_point_is_tested():
    assert set(FAULTS) == set(POINTS)
    for name, spec in FAULTS.items():
        assert [f.point for f in parse_faults(spec)] == [name]


def torchrun(run_dir, fault=None):
    env = {"LOCALLOSS_PP_FAULT": fault} if fault else {}
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--max-restarts", "2", "--nproc-per-node", "2", "-m", "localloss_pp", "train",
                  *ARGS, "--run-dir", str(run_dir)], **env)
    rc = s.wait(240)
    return rc, s.text


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("faults") / "ref"
    rc, text = torchrun(run)
    assert rc == 0, text[-3000:]
    assert "fault point" not in text
    return run


# one point in the default run (a kill window that once lost work: the epoch's record written,
# its checkpoint not), every point with `-m slow` (CI runs both)
QUICK = {"after-metrics-record"}


@pytest.mark.parametrize("point", [p if p in QUICK else pytest.param(p, marks=pytest.mark.slow)
                                   for p in FAULTS])
def test_kill_at_fault_point_loses_nothing(tmp_path, uninterrupted, point):
    run = tmp_path / "run"
    rc, text = torchrun(run, FAULTS[point])
    assert f"fault point {point} reached" in text, text[-3000:]
    assert rc == 0, text[-3000:]
    assert f"model-digest: {digest(uninterrupted)}" in text
    assert digest(run) == digest(uninterrupted)
    assert records(run) == records(uninterrupted)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["e00002-end"]
