"""CUDA runs: the same algorithm as on the CPU, stages sharing one GPU through gloo, NCCL
stages on several GPUs, bf16, channels-last and torch.compile. Skipped without CUDA.

Tolerances: a CUDA run is not bit-identical to a CPU run (other kernels, TF32 convolutions);
after one epoch of the tiny models here their losses agree to 2% and their test errors to 1.5
points. Runs on the same GPU with the same kernels are compared more tightly."""
import json
import sys

import pytest
import torch

from launch import Streamed, launch

MLP = ["--model", "mlp", "--dataset", "mnist5k", "--num-layers", "3", "--num-hidden", "256",
       "--dropout", "0.1", "--epochs", "1", "--no-progress"]
CONV = ["--model", "vgg8b", "--dataset", "mnist5k", "--feat-mult", "0.25", "--num-hidden", "256",
        "--epochs", "1", "--batch-size", "100", "--no-progress"]


def records(run_dir):
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def train(tmp_path, name, args, procs=1):
    run_dir = tmp_path / name
    results = launch(procs, ["train", *args, "--run-dir", str(run_dir)], timeout=300)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return records(run_dir), "".join(r.stderr for r in results)


def close(a, b, loss_rel=0.02, error_abs=1.5):
    for ra, rb in zip(a, b):
        assert ra["train"]["loss_local"] == pytest.approx(rb["train"]["loss_local"], rel=loss_rel)
        assert abs(ra["test"]["error"] - rb["test"]["error"]) <= error_abs


@pytest.mark.parametrize("args", [[*MLP, "--dropout", "0"], CONV], ids=["mlp", "conv"])
def test_cuda_agrees_with_cpu(tmp_path, args):
    # without dropout: CUDA and CPU generators draw different masks from the same seed
    cpu, _ = train(tmp_path, "cpu", [*args, "--device", "cpu", "--threads-per-rank", "8"])
    gpu, text = train(tmp_path, "cuda", [*args, "--device", "cuda"])
    assert "device cuda:0" in text
    close(gpu, cpu)


def test_two_stages_share_one_gpu_through_gloo(tmp_path):
    one, _ = train(tmp_path, "one", [*MLP, "--device", "cuda"])
    two, text = train(tmp_path, "two", [*MLP, "--device", "cuda:0", "--backend", "gloo"], 2)
    close(two, one, loss_rel=1e-3, error_abs=0.5)
    assert two[0]["stages"][0]["train"]["bytes_sent"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL stages need 2 GPUs")
def test_nccl_stages_on_two_gpus(tmp_path):
    one, _ = train(tmp_path, "one", [*CONV, "--device", "cuda:0"])
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", "localloss_pp", "train", *CONV, "--run-dir",
                  str(tmp_path / "nccl")])
    assert s.wait(300) == 0, s.text[-3000:]
    close(records(tmp_path / "nccl"), one, loss_rel=2e-3, error_abs=1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="2 stages x 2 replicas need 4 GPUs")
def test_nccl_stages_by_replicas(tmp_path):
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "4", "-m", "localloss_pp", "train", *CONV, "--replicas",
                  "2", "--run-dir", str(tmp_path / "r")])
    assert s.wait(300) == 0, s.text[-3000:]
    assert all(r["replicas_identical"] for r in records(tmp_path / "r"))


def test_bf16_and_channels_last_learn_like_fp32(tmp_path):
    fp32, _ = train(tmp_path, "fp32", [*CONV, "--device", "cuda"])
    bf16, _ = train(tmp_path, "bf16", [*CONV, "--device", "cuda", "--precision", "bf16",
                                       "--channels-last"])
    close(bf16, fp32, loss_rel=0.05, error_abs=3.0)


def test_bf16_on_the_wire_between_stages_sharing_a_gpu(tmp_path):
    one, _ = train(tmp_path, "one", [*CONV, "--device", "cuda", "--precision", "bf16"])
    two, _ = train(tmp_path, "two", [*CONV, "--device", "cuda:0", "--backend", "gloo",
                                     "--precision", "bf16"], 2)
    close(two, one, loss_rel=2e-3, error_abs=1.0)
    # bf16 activations: half the bytes of an fp32 run's
    fp32, _ = train(tmp_path, "two32", [*CONV, "--device", "cuda:0", "--backend", "gloo"], 2)
    b16 = two[0]["stages"][0]["train"]["bytes_sent"]
    b32 = fp32[0]["stages"][0]["train"]["bytes_sent"]
    assert b16 < 0.6 * b32


def test_compiled_blocks_on_cuda(tmp_path):
    eager, _ = train(tmp_path, "eager", [*MLP, "--device", "cuda"])
    compiled, _ = train(tmp_path, "compiled", [*MLP, "--device", "cuda", "--compile"])
    close(compiled, eager, loss_rel=0.01, error_abs=1.0)
