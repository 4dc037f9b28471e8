"""CUDA runs: the same algorithm as on the CPU, stages sharing one GPU through gloo, NCCL
stages on several GPUs, bf16, channels-last and torch.compile. Skipped without CUDA.

Tolerances: a CUDA run is not bit-identical to a CPU run (other kernels, TF32 convolutions);
after one epoch of the tiny models here their losses agree to 2% and their test errors to 1.5
points. Runs on the same GPU with the same kernels are compared more tightly."""
import sys

import pytest
import torch

from launch import Streamed, launch, records as read_records
from tolerances import assert_rounding_close
from runargs import mlp_args

MLP = mlp_args(3, 256, "--dropout", "0.1", "--epochs", "1", "--no-progress", quiet=False)
CONV = ["--model", "vgg8b", "--dataset", "mnist5k", "--feat-mult", "0.25", "--num-hidden", "256",
        "--epochs", "1", "--batch-size", "100", "--no-progress"]
RESNET = ["--model", "resnet18", "--dataset", "mnist5k", "--feat-mult", "0.125",
          "--dim-in-decoder", "1024", "--epochs", "1", "--batch-size", "100", "--no-progress"]


def train(tmp_path, name, args, procs=1):
    run_dir = tmp_path / name
    results = launch(procs, ["train", *args, "--run-dir", str(run_dir)], timeout=300)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return read_records(run_dir, keep_timing=True), "".join(r.stderr for r in results)


def close(a, b, loss_rel=0.02, error_abs=1.5):
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b, strict=True):
        assert ra["train"]["loss_local"] == pytest.approx(rb["train"]["loss_local"], rel=loss_rel)
        assert abs(ra["test"]["error"] - rb["test"]["error"]) <= error_abs


@pytest.mark.parametrize("args", [[*MLP, "--dropout", "0"], CONV, RESNET],
                         ids=["mlp", "conv", "resnet"])
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
    close(read_records(tmp_path / "nccl", keep_timing=True), one, loss_rel=2e-3, error_abs=1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="2 stages x 2 replicas need 4 GPUs")
def test_nccl_stages_by_replicas(tmp_path):
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "4", "-m", "localloss_pp", "train", *CONV, "--replicas",
                  "2", "--run-dir", str(tmp_path / "r")])
    assert s.wait(300) == 0, s.text[-3000:]
    assert all(r["replicas_identical"] for r in read_records(tmp_path / "r", keep_timing=True))


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


def test_compiled_blocks_on_cuda(tmp_path, monkeypatch):
    eager, _ = train(tmp_path, "eager", [*CONV, "--device", "cuda"])
    monkeypatch.setenv("TORCH_LOGS", "recompiles,graph_breaks")
    compiled, text = train(tmp_path, "compiled", [*CONV, "--device", "cuda", "--compile"])
    close(compiled, eager, loss_rel=0.01, error_abs=1.0)
    for a, b in zip(compiled[-1]["blocks"], eager[-1]["blocks"], strict=True):
        assert a["train"]["loss"] == pytest.approx(b["train"]["loss"], rel=0.01)
    # every block compiles its own graphs: no recompile limit hit, no graph break
    assert "recompile_limit" not in text and "Graph break" not in text, text[-3000:]


def test_compile_under_sync_debug_with_short_last_batches(tmp_path, monkeypatch):
    """mnist5k at batch 128 ends both streams with a short batch (4000 = 31 x 128 + 32, 1000 =
    7 x 128 + 104). The set-up warm-up compiles those shapes, and the received activations'
    (two stages sharing the GPU), before the links: no compilation, whose autotuning
    synchronises the device, runs inside a steady-state batch checked by sync-debug."""
    monkeypatch.setenv("LOCALLOSS_PP_SYNC_DEBUG", "error")
    args = [*MLP, "--batch-size", "128", "--compile"]
    for procs, extra in ((1, ["--device", "cuda"]),
                         (2, ["--device", "cuda:0", "--backend", "gloo"])):
        recs, text = train(tmp_path, f"compiled-{procs}", [*args, *extra], procs)
        assert recs and "synchroniz" not in text.lower(), text[-3000:]
        assert "compiled on synthetic batches" in text


@pytest.mark.parametrize("procs,extra", [(1, ["--device", "cuda"]),
                                         (2, ["--device", "cuda:0", "--backend", "gloo"])],
                         ids=["one-stage", "two-stages-sharing-the-gpu"])
def test_no_host_sync_in_steady_state_batches(tmp_path, monkeypatch, procs, extra):
    # any synchronising CUDA call in a train or eval batch after the first two fails the run
    monkeypatch.setenv("LOCALLOSS_PP_SYNC_DEBUG", "error")
    for args in (MLP, CONV + ["--cutout"], RESNET + ["--dropout", "0.1"]):
        recs, text = train(tmp_path, f"{args[1]}-{procs}", [*args, *extra], procs)
        assert recs and "synchroniz" not in text.lower(), text[-3000:]


def test_device_resident_batches_match_the_cpu_path():
    from localloss_pp.config import DataConfig
    from localloss_pp.data.datasets import build_sources
    cfg = DataConfig(dataset="mnist5k", batch_size=200, cutout=True)
    cpu_train, cpu_test, _ = build_sources(cfg, 1, torch.device("cpu"))
    gpu_train, gpu_test, _ = build_sources(cfg, 1, torch.device("cuda"))
    assert gpu_train.images.is_cuda and gpu_train.images.dtype == torch.uint8
    for (xc, yc, hc), (xg, yg, hg) in zip(cpu_test, gpu_test, strict=True):
        assert xg.is_cuda and yg.is_cuda and not hg.is_cuda
        # the GPU normalises with its own kernels (fused multiply-adds): the same three
        # elementwise roundings (scale, shift, divide) per pixel, nothing summed
        assert_rounding_close(xg.cpu(), xc, terms=3)
        assert torch.equal(hg, hc) and torch.equal(yg.cpu(), yc)
    # training batches: the same order and labels; the augmentation draws come from the GPU's
    # generator, so only their properties are compared
    for (xc, _, hc), (xg, _, hg) in zip(cpu_train, gpu_train, strict=True):
        assert torch.equal(hg, hc) and xg.shape == xc.shape
        assert (xg.cpu() == 0).any()  # cutout holes
        torch.testing.assert_close(xg.mean(), xc.mean().cuda(), rtol=0.1, atol=0.05)


def test_image_folder_batches_arrive_pinned_on_the_gpu(tmp_path):
    import numpy as np
    from PIL import Image

    from localloss_pp.config import DataConfig
    from localloss_pp.data.datasets import build_sources
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = tmp_path / "ImageNet" / split / c
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((40, 40, 3), i * 40, dtype=np.uint8)).save(
                    folder / f"{i}.png")
    cfg = DataConfig(dataset="ImageNet", data_dir=str(tmp_path), batch_size=4)
    train_src, _, _ = build_sources(cfg, 1, torch.device("cuda"), num_workers=2)
    x, y, y_host = next(iter(train_src))
    assert x.is_cuda and y.is_cuda and y_host.is_pinned() and x.shape == (4, 3, 224, 224)
