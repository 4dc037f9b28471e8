"""Which backend links the stages of a node: decided from the physical GPUs of its processes,
exchanged through the launch's store, not from how many GPUs one process sees. A launcher that
gives each process its own GPU through CUDA_VISIBLE_DEVICES shows every process one "cuda:0";
that used to read as "processes share GPUs" and switched silently to gloo with CPU staging."""
import threading

import pytest
import torch
import torch.distributed as dist

from localloss_pp.config import TrainConfig
from localloss_pp.pipeline.distributed import (_choose_backend, local_gpu_identities,
                                               payload_timeout)

CUDA0 = torch.device("cuda:0")  # a device name only: nothing here touches a GPU


def test_processes_masked_to_one_gpu_each_get_nccl(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # what each process sees
    caplog.set_level("INFO", logger="localloss_pp")
    backend = _choose_backend(TrainConfig(device="cuda"), CUDA0, world=2, local_rank=0,
                              local_world=2, identities=["GPU-1111", "GPU-2222"])
    assert backend == "nccl"
    assert "sees its own GPU (CUDA_VISIBLE_DEVICES): NCCL" in caplog.text


def test_processes_on_one_physical_gpu_get_gloo_with_staging(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    backend = _choose_backend(TrainConfig(device="cuda:0"), CUDA0, world=2, local_rank=0,
                              local_world=2, identities=["GPU-1111", "GPU-1111"])
    assert backend == "gloo" and "share GPUs" in caplog.text
    with pytest.raises(ValueError, match="NCCL needs one GPU per process"):
        _choose_backend(TrainConfig(device="cuda:0", backend="nccl"), CUDA0, world=2,
                        local_rank=0, local_world=2, identities=["GPU-1111", "GPU-1111"])


def test_the_node_exchanges_gpu_identities_through_the_store():
    master = dist.TCPStore("127.0.0.1", 0, 3, True, wait_for_workers=False)
    results = {}

    def process(local_rank, name):
        store = dist.TCPStore("127.0.0.1", master.port, 3, False)
        results[local_rank] = local_gpu_identities(store, 0, local_rank, 2, name)
    threads = [threading.Thread(target=process, args=(r, f"GPU-{r}")) for r in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {0: ["GPU-0", "GPU-1"], 1: ["GPU-0", "GPU-1"]}


def test_nccl_waits_longer_than_the_host_side_detection():
    # a lost peer must be reported by the stage (gloo header, send poll: --timeout-s) before
    # NCCL's watchdog aborts the process with its own message
    assert payload_timeout(60).total_seconds() > 60 + 10
