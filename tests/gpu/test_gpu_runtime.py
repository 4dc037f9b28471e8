"""The runtime's GPU semantics on one GPU, inside this process (no launches, so no cold start
per test): what the stage clock counts as busy and as sync, compared with the profiler's kernel
times; and a stand-in for NCCL's double-buffered receives, whose completion is only a stream
wait. Skipped without CUDA.

Tolerances, stated: a stream wait for a 20 ms kernel on a side stream is counted as sync within
20%; the busy time of a GPU-bound stage (a full-width VGG on 32x32 images, batch 256) lies
between the profiler's sum of its kernel times and 1.5 times that sum plus 1 ms per batch (the
events bracket the kernels, with the launch gaps between them)."""
import pytest
import torch

from localloss_pp.config import LossConfig, ModelConfig, OptimConfig
from localloss_pp.models import build_model, model_digest
from localloss_pp.observe.metrics import StageClock
from localloss_pp.pipeline import transport
from localloss_pp.pipeline.stage import StageRunner
from localloss_pp.pipeline.transport import (END_EVAL, END_TRAIN, EVAL, STOP, TRAIN, Receiver,
                                             Sender)

CUDA = torch.device("cuda")


def _cycles_per_ms() -> float:
    """torch.cuda._sleep spins for a number of GPU clock cycles: how many make a millisecond."""
    torch.cuda._sleep(1000)  # load the kernel
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / begin.elapsed_time(end)


def test_a_stream_wait_for_the_replicas_is_sync_time_not_busy_time():
    """With NCCL the wait for a replica all-reduce only makes the compute stream wait: the
    stall used to land inside the compute events, as busy time."""
    per_ms = _cycles_per_ms()
    clock, side = StageClock(CUDA), torch.cuda.Stream()
    a = torch.randn(1024, 1024, device=CUDA)
    torch.cuda.synchronize()
    clock.read()
    for _ in range(5):
        with clock.section("compute"):
            b = a @ a
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # the "all-reduce": 20 ms on its own stream
                torch.cuda._sleep(int(20 * per_ms))
            with clock.section("sync"):  # what NCCL's Work.wait() does
                torch.cuda.current_stream().wait_stream(side)
            b = b @ a
    seconds = clock.read()
    assert seconds["sync"] == pytest.approx(0.1, rel=0.2)
    assert seconds["compute"] < 0.02, seconds  # two small matmuls per batch


def _stage(net, first=0, receiver=None):
    return StageRunner(blocks=net.blocks[first:], output=net.output, stage_index=0,
                       num_stages=1, device=CUDA, num_classes=10, sender=None,
                       receiver=receiver, with_stats=False, check_every=10 ** 9)


def test_busy_time_is_the_gpu_time_of_the_stages_kernels():
    from torch.profiler import ProfilerActivity, profile
    net = build_model(ModelConfig(name="vgg8b", feat_mult=1.0, num_hidden=1024), LossConfig(),
                      (3, 32, 32), 10, seed=0)
    for unit in net.units():
        unit.setup(CUDA, OptimConfig(lr=1e-4))
    gen = torch.Generator(device=CUDA).manual_seed(0)
    batches = [(torch.randn(256, 3, 32, 32, device=CUDA, generator=gen),
                torch.randint(10, (256,), device=CUDA, generator=gen)) for _ in range(8)]
    data = [(x, y, y.cpu()) for x, y in batches]
    runner = _stage(net)
    runner.train_epoch(1, data, len(data))  # warm: cuDNN autotuning, allocations
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        busy = runner.train_epoch(2, data, len(data)).times.busy_s
        torch.cuda.synchronize()
    kernels = sum(e.time_range.elapsed_us() for e in prof.events()
                  if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
    assert kernels > 0
    assert kernels * 0.98 <= busy <= 1.5 * kernels + 1e-3 * len(data), (busy, kernels)


class _NcclLike:
    """Point-to-point with NCCL's completion semantics on one GPU: a payload receive writes its
    slot on a side stream after a delay (ordered after the work already queued on the current
    stream, as NCCL's stream is at issue), and `wait()` only makes the current stream wait.
    Headers (the gloo meta group) complete on the host."""

    def __init__(self, per_ms: float):
        self.per_ms, self.side = per_ms, torch.cuda.Stream()
        self.headers, self.payloads = [], []

    class Done:
        def wait(self):
            return True

        def is_completed(self):
            return True

    class Queued:
        def __init__(self, event):
            self.event = event

        def wait(self):
            torch.cuda.current_stream().wait_event(self.event)
            return True

        def is_completed(self):
            return self.event.query()

    def isend(self, tensor, dst, group=None):
        (self.headers if group == "meta" else self.payloads).append(tensor.clone())
        return self.Done()

    def irecv(self, tensor, src, group=None):
        if group == "meta":
            tensor.copy_(self.headers.pop(0))
            return self.Done()
        source = self.payloads.pop(0)
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(int(3 * self.per_ms))  # arrives late: the reader must wait
            tensor.copy_(source, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        source.record_stream(self.side)
        return self.Queued(done)


def test_reused_receive_slots_on_one_gpu_give_the_result_of_direct_input(monkeypatch):
    """The receiver's two slots are re-posted while the previous batch's kernels may still be
    queued; with stream-only completion every batch must still read its own activation. The
    received stream trains a stage exactly as the same activations handed over directly."""
    wire = _NcclLike(_cycles_per_ms())
    monkeypatch.setattr(transport.dist, "isend", wire.isend)
    monkeypatch.setattr(transport.dist, "irecv", wire.irecv)
    cfg = ModelConfig(name="mlp", num_layers=3, num_hidden=512, dropout=0.0)
    gen = torch.Generator(device=CUDA).manual_seed(1)
    stream = [(torch.randn(n, 512, device=CUDA, generator=gen),
               torch.randint(10, (n,), device=CUDA, generator=gen)) for n in (64,) * 9 + (17,)]

    def net():
        m = build_model(cfg, LossConfig(), (1, 16, 32), 10, seed=3)
        for unit in m.units():
            unit.setup(CUDA, OptimConfig(lr=1e-3))
        return m  # the receiving stage runs every block after the first

    common = dict(num_stages=2, sample_shape=(512,), dtype=torch.float32, max_batch=64,
                  device=CUDA, group="payload", meta_group="meta", timeout_s=30)
    sender = Sender(stage_index=0, peer_rank=1, peer_stage=1, queue_depth=2, **common)
    for i, (x, y) in enumerate(stream):
        sender.send(TRAIN, 1, i, x, y.cpu(), last=i == len(stream) - 1)
    sender.send(END_TRAIN, 1, len(stream))
    for i, (x, y) in enumerate(stream[:3]):
        sender.send(EVAL, 1, i, x, y.cpu())  # last not known: the marker brings a payload
    sender.send(END_EVAL, 1, 3)
    sender.send(STOP, 0, 0)
    sender.drain()
    received = net()
    receiver = Receiver(stage_index=1, peer_rank=0, peer_stage=0, **common)
    stage = _stage(received, 1, receiver=receiver)
    stage.train_epoch(1, None, len(stream))
    stage.eval_epoch(1, None, 3)
    stage.stop()
    direct = net()
    _stage(direct, 1).train_epoch(1, [(x, y, y.cpu()) for x, y in stream], len(stream))
    torch.cuda.synchronize()
    assert model_digest(received) == model_digest(direct)
