"""The order of a run's set-up: every collective before any point-to-point receive is posted,
no receive left posted across the collectives of an epoch's end, and no collective that
unpickles what another process sent (NCCL documents that
operations on several communicators at once can deadlock; with lazily created NCCL
communicators a collective behind a posted receive blocks the whole set-up)."""
import json
import os

import pytest

from launch import free_port, spawn
from runargs import mlp_args

COLLECTIVES = ("all_gather", "broadcast", "all_gather_object", "gather_object",
               "broadcast_object_list", "barrier", "all_reduce", "new_group")


def _stage(rank: int, world: int, port: int, run_dir: str, out: str, extra=()) -> None:
    # two processes on two "nodes" (GROUP_RANK), so the shared-run-dir check runs too
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from localloss_pp.pipeline import transport
    from localloss_pp.cli import build_parser
    from localloss_pp.flags import config_from_args
    from localloss_pp.training import run_training

    receivers, links, events = [], [], []
    original_init = transport.Receiver.__init__
    original_send_init = transport.Sender.__init__

    def init(self, **kw):
        original_init(self, **kw)
        receivers.append(self)
        links.append(self)
    transport.Receiver.__init__ = init

    def send_init(self, **kw):
        original_send_init(self, **kw)
        links.append(self)
    transport.Sender.__init__ = send_init

    def spy(name):
        fn = getattr(dist, name)

        def call(*args, **kw):
            posted = any(getattr(r, "_pending", None) is not None for r in receivers)
            events.append([name, posted, bool(links)])  # links: any link made yet
            return fn(*args, **kw)
        setattr(dist, name, call)
    for name in COLLECTIVES:
        spy(name)
    args = build_parser().parse_args([
        "train", *mlp_args(2, 32, "--epochs", "2", "--no-progress", "--timeout-s", "60",
                           quiet=False, one_thread=True), "--run-dir", run_dir, *extra])
    run_training(config_from_args(args))
    with open(out, "w") as fh:
        json.dump(events, fh)


def test_no_collective_runs_while_a_receive_is_posted(tmp_path):
    port = free_port()
    codes = spawn(_stage, 2, lambda r: (r, 2, port, str(tmp_path / "run"),
                                        str(tmp_path / f"events{r}.json")), 120)
    assert codes == [0, 0]
    for r in range(2):
        events = json.loads((tmp_path / f"events{r}.json").read_text())
        names = [e[0] for e in events]
        assert "all_gather" in names and "broadcast" in names
        assert not [e for e in events if e[1]], (r, events)
        # what the ranks exchange is data (JSON in tensors): nobody unpickles a peer's bytes
        assert not [n for n in names if "_object" in n], names


@pytest.mark.slow
def test_replica_groups_have_their_first_collective_before_any_link(tmp_path):
    """2 stages x 2 replicas: each stage's replica group runs a collective in the set-up,
    before any link exists. On NCCL that creates the group's communicator there; made by the
    first gradient all-reduce inside batch 0 instead, while the links' sends and receives are
    in flight on other communicators, it can deadlock (NCCL runs several communicators'
    operations concurrently only in the same order on every rank)."""
    port = free_port()
    codes = spawn(_stage, 4, lambda r: (r, 4, port, str(tmp_path / "run"),
                                        str(tmp_path / f"events{r}.json"),
                                        ("--replicas", "2", "--epochs", "1")), 180)
    assert codes == [0, 0, 0, 0]
    for r in range(4):
        events = json.loads((tmp_path / f"events{r}.json").read_text())
        reduces = [e for e in events if e[0] == "all_reduce"]
        assert reduces and not reduces[0][2], (r, events)
