"""Multi-process pipeline runs on CPU/gloo: equivalence with the one-process run, failures."""
import json
import os
import signal
import sys
import time

import pytest

from launch import ROOT, Streamed, digest, launch, records as comparable
from runargs import mlp_args

MLP = mlp_args(4, 64, "--dropout", "0.1", "--cutout", "--length", "8", "--epochs", "2",
               quiet=False)
CONV = ["--model", "vgg8b", "--dataset", "mnist5k", "--feat-mult", "0.0625",
        "--dim-in-decoder", "128", "--num-hidden", "64", "--dropout", "0.1", "--epochs", "2",
        "--batch-size", "100"]
# a tiny Vision Transformer: patch embedding + 3 transformer blocks, tokens (16, 16) on the wire
VIT = ["--model", "vit-3-16-p7", "--dataset", "mnist5k", "--dropout", "0.1", "--epochs", "2",
       "--batch-size", "100", "--lr", "1e-3"]


def run_stages(tmp_path, name, num_stages, args, extra=()):
    run_dir = tmp_path / f"{name}-{num_stages}"
    results = launch(num_stages, ["train", *args, "--run-dir", str(run_dir),
                                  "--threads-per-rank", "1", "--no-progress", *extra])
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, results


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of a configuration, run once per module."""
    cache = {}

    def get(name, args):
        if name not in cache:
            cache[name] = run_stages(tmp_path_factory.mktemp(name), name, 1, args)[0]
        return cache[name]
    return get


SLOW = pytest.mark.slow


# the default run: 1 against 2 stages for the linear and conv blocks, and one 3-stage case;
# `-m slow` adds the ViTs, the 4-stage pipelines and bf16 on the wire (the ResNets:
# test_residual_pipelines.py)
@pytest.mark.parametrize("name,args,stage_counts", [
    ("mlp", MLP, [1, 2, 3]), ("conv", CONV, [1, 2]),
    pytest.param("mlp", MLP, [1, 4], marks=SLOW, id="mlp-4-stages"),
    pytest.param("conv", CONV, [1, 4], marks=SLOW, id="conv-4-stages"),
    pytest.param("vit", VIT, [1, 2, 3, 4], marks=SLOW, id="vit-2-3-4-stages"),
    # bf16 activations on the wire (and between the blocks of a stage), NHWC convolutions
    pytest.param("conv-bf16", CONV + ["--precision", "bf16", "--channels-last"], [1, 3],
                 marks=SLOW, id="conv-bf16")])
def test_pipeline_equals_one_process(tmp_path, one_process, name, args, stage_counts):
    runs = {s: one_process(name, args) if s == 1 else run_stages(tmp_path, name, s, args)[0]
            for s in stage_counts}
    ref_digest, ref_metrics = digest(runs[1]), comparable(runs[1])
    assert len(ref_metrics) == 2 and all(r["blocks"] for r in ref_metrics)
    for s in stage_counts[1:]:
        assert digest(runs[s]) == ref_digest, f"{s} stages"
        assert comparable(runs[s]) == ref_metrics, f"{s} stages"
        part = json.loads((runs[s] / "partition.json").read_text())
        assert len(part["counts"]) == s
        stages = comparable(runs[s], keep_timing=True)[0]["stages"]
        assert [st["stage"] for st in stages] == list(range(s))
        batches = -(-4000 // (100 if "--batch-size" in args else 128))
        for st in stages:
            t, first, last = st["train"], st["stage"] == 0, st["stage"] == s - 1
            assert 0 < t["busy_fraction"] <= 1.0 and t["batches"] == batches
            # only the first stage loads data, only the others receive, the last sends nothing
            assert (t["data_s"] > 0) == first and (t["wait_recv_s"] > 0) == (not first)
            assert (t["wait_send_s"] > 0) == (not last) and (t["bytes_sent"] > 0) == (not last)
            parts = t["busy_s"] + t["data_s"] + t["wait_recv_s"] + t["wait_send_s"]
            assert parts <= 1.01 * t["wall_s"] + 0.01


@pytest.mark.slow
def test_partial_last_batches_on_every_stage_count(tmp_path):
    # 4000 training and 1000 test examples in batches of 96: the last ones hold 64 and 40
    args = [a for a in MLP if a not in ("--epochs", "2")] + ["--epochs", "1", "--batch-size", "96"]
    runs = {s: run_stages(tmp_path, "partial", s, args)[0] for s in (1, 2, 3)}
    ref = comparable(runs[1])
    assert ref[0]["train"]["num_examples"] == 4000 and ref[0]["test"]["num_examples"] == 1000
    for s in (2, 3):
        assert digest(runs[s]) == digest(runs[1]), f"{s} stages"
        assert comparable(runs[s]) == ref, f"{s} stages"


@pytest.mark.slow
def test_finished_runs_exit_normally(tmp_path):
    # success destroys the process group and returns from main (no os._exit); the modules a
    # run imports lazily are imported before the group exists, so no finished run aborts in
    # the interpreter's teardown ("terminate called without an active exception")
    args = mlp_args(3, 32, "--epochs", "1", "--no-print-stats", quiet=False)
    for i in range(3):
        _, results = run_stages(tmp_path, f"exit{i}", 3, args)
        for r in results:
            assert "terminate called" not in r.stderr and "Abort" not in r.stderr


@pytest.mark.slow
def test_explicit_and_auto_partitions_keep_the_result(tmp_path, one_process):
    ref = one_process("conv", CONV)
    manual, _ = run_stages(tmp_path, "manual", 3, CONV, ["--partition", "1,1,5"])
    assert json.loads((manual / "partition.json").read_text())["counts"] == [1, 1, 5]
    auto, res = run_stages(tmp_path, "auto", 2, CONV, ["--partition", "auto"])
    part = json.loads((auto / "partition.json").read_text())
    assert part["how"] == "auto" and part["unit"] == "ms" and len(part["block_costs"]) == 7
    assert "ms/batch" in res[0].stderr
    assert digest(ref) == digest(manual) == digest(auto)


@pytest.mark.slow
def test_real_torchrun_launch(tmp_path):
    run_dir = tmp_path / "torchrun"
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", "localloss_pp", "train", *MLP, "--run-dir",
                  str(run_dir), "--threads-per-rank", "1"])
    assert s.wait(240) == 0, s.text[-3000:]
    ref, _ = run_stages(tmp_path, "single", 1, MLP)
    assert f"model-digest: {digest(ref)}" in s.text
    assert "[stage 1/2]" in s.text and "[stage 2/2] epoch 2/2" in s.text


def _slow(*values):
    return pytest.param(*values, marks=SLOW)


# one refusal of each phase in the default run: launch checks, the partition, the run directory
@pytest.mark.parametrize("num_stages,args,message", [
    (2, ["--backprop"], "--backprop trains end to end and cannot be pipelined"),
    _slow(2, ["--no-detach"], "--no-detach trains end to end and cannot be pipelined"),
    _slow(3, ["--num-layers", "2"], "3 stages but mlp has only 2 blocks"),
    (2, ["--partition", "2,1,1"], "has 3 stages, but the run has 2 processes"),
    _slow(2, ["--partition", "2,1"], "covers 3 blocks, but the model has 4"),
    _slow(2, ["--dataset", "CIFAR10", "--data-dir", "/nonexistent"], "pass --download"),
    # checked first, before any data is read or model built
    (2, ["--run-dir", "/dev/null/run"], "run directory /dev/null/run cannot be created: a part "
     "of its path is a file"),
    # stages x replicas
    (3, ["--replicas", "2"], "needs a world size that is a multiple of 2"),
    _slow(4, ["--replicas", "2", "--backprop"], "cannot be pipelined across 2 stages"),
    _slow(2, ["--replicas", "2", "--batch-size", "2"], "leaves a replica with 1 example(s)"),
])
def test_bad_pipeline_setups_fail_cleanly_on_every_stage(tmp_path, num_stages, args, message):
    argv = ["train", *mlp_args(4, 32, "--epochs", "1", quiet=False), "--run-dir",
            str(tmp_path / "r"), *args]
    results = launch(num_stages, argv, timeout=120)
    for r in results:
        assert r.returncode == 2, r.stderr[-2000:]
        assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_stages_with_different_configs_are_refused(tmp_path):
    from launch import _env, free_port
    import subprocess
    port = free_port()
    procs = []
    for rank, hidden in ((0, "32"), (1, "48")):
        env = _env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=2,
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "localloss_pp", "train",
             *mlp_args(2, hidden, "--epochs", "1", quiet=False), "--run-dir", str(tmp_path / "r")], env=env, cwd=ROOT, stderr=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode != 0 for p in procs)
    text = outs[0][1] + outs[1][1]
    assert "different configs" in text or "disagree" in text


def test_failing_stage_names_itself_and_brings_the_others_down(tmp_path):
    # an absurd learning rate makes a local loss non-finite within a few steps
    start = time.monotonic()
    results = launch(2, ["train", *MLP, "--lr", "1e30", "--run-dir", str(tmp_path / "r")],
                     timeout=120)
    assert time.monotonic() - start < 60
    assert all(r.returncode == 1 for r in results)
    text = results[0].stderr + results[1].stderr
    assert "non-finite loss" in text and "of epoch 1" in text and "[stage " in text


@pytest.mark.slow
def test_sigkill_of_a_stage_ends_the_torchrun_run(tmp_path):
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "3", "-m", "localloss_pp", "train",
                  *mlp_args(3, 256, "--epochs", "20", quiet=False, one_thread=True),
                  "--run-dir", str(tmp_path / "r")])
    try:
        pid = int(s.wait_for(r"\[stage 2/3\] pid (\d+)", 90).group(1))
        s.wait_for(r"\[stage 3/3\] epoch 1/20", 120)  # now in epoch 2
        time.sleep(0.5)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        rc = s.wait(60)
    finally:
        s.kill()
    assert rc != 0
    assert time.monotonic() - killed < 60
    assert "lost stage 2/3" in s.text or "rank      : 1" in s.text, s.text[-3000:]
