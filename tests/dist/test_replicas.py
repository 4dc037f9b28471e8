"""Stages x replicas on CPU/gloo: the same numbers on any stage count and launch, replicas that
stay identical, multi-node launches (two torchrun agents over loopback), SLURM, resume."""
import json
import os
import re
import stat
import sys

import pytest

from launch import ROOT, Streamed, digest, free_port, launch, records as comparable
from runargs import mlp_args

MLP = mlp_args(4, 64, "--dropout", "0.1", "--cutout", "--length", "8", "--epochs", "2",
               quiet=False)
DIGEST_LINE = re.compile(r"\[stage (\d+)/(\d+), replica (\d+)/(\d+)\] epoch (\d+): weights "
                         r"sha256 (\w+)")


def replica_digests(text: str) -> dict:
    """{(stage, epoch): {replica: digest}} from the log lines every replica prints."""
    out = {}
    for stage, _, replica, _, epoch, d in DIGEST_LINE.findall(text):
        out.setdefault((int(stage), int(epoch)), {})[int(replica)] = d
    return out


def check_replicas_agree(text: str, num_stages: int, num_replicas: int, epochs: int = 2):
    found = replica_digests(text)
    assert set(found) == {(k, e) for k in range(1, num_stages + 1) for e in range(1, epochs + 1)}
    for key, per_replica in found.items():
        assert set(per_replica) == set(range(1, num_replicas + 1)), key
        assert len(set(per_replica.values())) == 1, f"replicas differ at {key}: {per_replica}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """2 replicas of a 1-stage pipeline, with mid-epoch checkpoints."""
    run_dir = tmp_path_factory.mktemp("replicas") / "ref"
    results = launch(2, ["train", *MLP, "--replicas", "2", "--run-dir", str(run_dir),
                         "--threads-per-rank", "1", "--no-progress", "--checkpoint-every", "10",
                         "--keep-checkpoints", "10"])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, "".join(r.stderr for r in results)


def torchrun(args, procs, run_dir):
    return Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node", str(procs), "-m", "localloss_pp", "train", *args,
                     "--run-dir", str(run_dir), "--threads-per-rank", "1", "--no-progress"])


def test_two_stages_by_two_replicas_under_torchrun_equal_one_stage(reference, tmp_path):
    ref_dir, ref_text = reference
    check_replicas_agree(ref_text, 1, 2)
    records = comparable(ref_dir)
    assert [r["num_replicas"] for r in records] == [2, 2]
    assert all(r["replicas_identical"] for r in records)
    # every sample once per epoch across the replicas
    assert all(r["train"]["num_examples"] == 4000 and r["test"]["num_examples"] == 1000
               for r in records)
    s = torchrun([*MLP, "--replicas", "2"], 4, tmp_path / "s2r2")
    assert s.wait(240) == 0, s.text[-3000:]
    assert f"model-digest: {digest(ref_dir)}" in s.text
    assert comparable(tmp_path / "s2r2") == records
    check_replicas_agree(s.text, 2, 2)
    assert "2 stage(s) x 2 replica(s) = 4 ranks" in s.text
    assert "replica 2: stage 1 (rank 2, node 0, cpu) -> stage 2 (rank 3, node 0, cpu)" in s.text
    assert "[stage 2/2, replica 1/2] epoch 2/2" in s.text


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same job in one process, one replica."""
    run_dir = tmp_path_factory.mktemp("single") / "one"
    results = launch(1, ["train", *MLP, "--run-dir", str(run_dir), "--no-progress",
                         "--threads-per-rank", "1"])
    assert results[0].returncode == 0, results[0].stderr[-3000:]
    return run_dir


def test_replicated_error_is_close_to_the_one_replica_run(reference, single):
    ref_dir, _ = reference
    one = comparable(single)[-1]["test"]["error"]
    two = comparable(ref_dir)[-1]["test"]["error"]
    # the same global batch and steps; BatchNorm and the similarity matrices see half a batch
    assert abs(one - two) < 3.0, (one, two)


@pytest.mark.slow
def test_mid_epoch_checkpoint_of_replicas_resumes_on_another_stage_count(reference, tmp_path):
    ref_dir, _ = reference
    ckpt = ref_dir / "checkpoints" / "e00002-s0000010"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["num_replicas"] == 2
    results = launch(4, ["train", *MLP, "--replicas", "2", "--resume", str(ckpt), "--run-dir",
                         str(tmp_path / "resumed"), "--threads-per-rank", "1", "--no-progress"])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    assert digest(tmp_path / "resumed") == digest(ref_dir)
    assert comparable(tmp_path / "resumed") == comparable(ref_dir)[1:]
    # within an epoch the data position is per replica: another replica count is refused
    results = launch(1, ["train", *MLP, "--resume", str(ckpt), "--run-dir",
                         str(tmp_path / "other")])
    assert results[0].returncode == 2
    assert "resume it with --replicas 2" in results[0].stderr


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(reference, tmp_path):
    """launch/multinode.sh started twice on this machine: 2 nodes x 2 processes over loopback,
    2 stages x 2 replicas, one replica per node."""
    ref_dir, _ = reference
    endpoint = f"127.0.0.1:{free_port()}"
    env = {"PYTHON": sys.executable, "RDZV_ID": f"test-{os.getpid()}"}
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), "2", "2", endpoint, *MLP,
           "--replicas", "2", "--run-dir", str(tmp_path / "nodes"), "--threads-per-rank", "1",
           "--no-progress"]
    nodes = [Streamed(cmd, **env) for _ in range(2)]
    codes = [n.wait(300) for n in nodes]
    text = "".join(n.text for n in nodes)
    assert codes == [0, 0], text[-4000:]
    assert f"model-digest: {digest(ref_dir)}" in text
    assert re.search(r"replica 1: stage 1 \(rank 0, node (\d)[^>]*> stage 2 \(rank 1, node \1",
                     text), text
    assert "0 of 2 stage-to-stage links cross nodes" in text
    check_replicas_agree(text, 2, 2)


def test_a_pipeline_across_two_nodes(single, tmp_path):
    """Two agents with one process each: the 2-stage pipeline's link crosses the nodes."""
    endpoint = f"127.0.0.1:{free_port()}"
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), "2", "1", endpoint, *MLP,
           "--run-dir", str(tmp_path / "nodes"), "--threads-per-rank", "1", "--no-progress"]
    nodes = [Streamed(cmd, PYTHON=sys.executable, RDZV_ID=f"test2-{os.getpid()}")
             for _ in range(2)]
    codes = [n.wait(300) for n in nodes]
    text = "".join(n.text for n in nodes)
    assert codes == [0, 0], text[-4000:]
    assert "1 of 1 stage-to-stage links cross nodes" in text
    assert f"model-digest: {digest(single)}" in text
    assert not list((tmp_path / "nodes").glob(".shared-*"))  # the shared-directory probe


@pytest.mark.slow
def test_slurm_script_starts_one_agent_per_node(reference, tmp_path):
    """launch/slurm.sbatch under stand-ins for srun and scontrol that start the per-node
    command once per node on this machine."""
    ref_dir, _ = reference
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # a long host list (as on a big allocation): more than a pipe holds, so a reader that
    # stops after the first line would kill scontrol with SIGPIPE
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\nfor i in $(seq 1 20000); do echo 127.0.0.1; done\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n# drop srun's own options, run the command once per node\n"
        "while [[ $1 == --* ]]; do shift; done\npids=()\n"
        "for i in $(seq 1 $SLURM_JOB_NUM_NODES); do SLURM_NODEID=$((i-1)) \"$@\" & "
        "pids+=($!); done\nrc=0\nfor p in ${pids[@]}; do wait $p || rc=1; done\nexit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    port = free_port()
    s = Streamed(["bash", str(ROOT / "launch" / "slurm.sbatch"), *MLP, "--replicas", "2",
                  "--run-dir", str(tmp_path / "slurm"), "--threads-per-rank", "1",
                  "--no-progress"],
                 PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
                 SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES=2, SLURM_JOB_ID=4242,
                 SLURM_SUBMIT_DIR=str(ROOT), PROCS_PER_NODE=2, RDZV_PORT=port)
    assert s.wait(300) == 0, s.text[-4000:]
    assert f"model-digest: {digest(ref_dir)}" in s.text


@pytest.mark.slow
def test_global_backprop_runs_data_parallel(tmp_path):
    results = launch(2, ["train", *MLP[:-1], "1", "--backprop", "--replicas", "2", "--run-dir",
                         str(tmp_path / "bp"), "--threads-per-rank", "1", "--no-progress"])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    check_replicas_agree("".join(r.stderr for r in results), 1, 2, epochs=1)
    record = comparable(tmp_path / "bp")[0]
    assert record["train"]["num_examples"] == 4000 and record["test"]["error"] < 50
