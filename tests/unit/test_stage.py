"""The stage loop in one process: StageRunners linked by in-memory links (a queue with the
Sender/Receiver interface), so the hot loop's normal path (receive -> forwards -> send -> local
updates -> statistics, end markers, a partial last batch, the stop message) has a fast test
that needs no process group. The multi-process equivalence runs are in tests/dist/."""
from collections import deque

import pytest
import torch

from localloss_pp.config import LossConfig, ModelConfig, OptimConfig, RunMode
from localloss_pp.models import build_model, model_digest
from localloss_pp.pipeline.globalmode import GlobalRunner
from localloss_pp.pipeline.stage import StageFailure, StageRunner
from localloss_pp.pipeline.transport import END_TRAIN, EVAL, STOP, TRAIN, Message

INPUT, CLASSES, EXAMPLES, BATCH = (1, 6, 6), 4, 50, 16  # batches of 16, 16, 16 and 2


class MemoryLink:
    """Sender and Receiver in one: messages wait in a queue until the next stage takes them."""

    def __init__(self, side_shape=None):
        self.queue: deque[Message] = deque()
        self.bytes = 0
        self.side_shape = side_shape  # the network's input goes along (as on the wire)

    def send(self, kind, epoch, seq, activation=None, labels=None, last=None, side=None):
        if activation is None:
            self.queue.append(Message(kind, epoch, seq))
            return
        assert labels.device.type == "cpu"  # the header's labels come from the host
        assert (side is not None) == bool(self.side_shape)
        act = activation.detach().clone()
        self.bytes += act.numel() * act.element_size()
        if side is not None:
            side = side.detach().clone()
            self.bytes += side.numel() * side.element_size()
        self.queue.append(Message(kind, epoch, seq, labels=labels.clone(), activation=act,
                                  labels_device=labels.clone(), last=bool(last), side=side))

    def recv(self, hold_after=None):
        return self.queue.popleft()

    def drain(self):
        pass

    def settle(self):
        pass


def model(**loss):
    m = build_model(ModelConfig(name="mlp", num_layers=3, num_hidden=24, dropout=0.1),
                    LossConfig(**loss), INPUT, CLASSES, seed=5)
    for unit in m.units():
        unit.setup(torch.device("cpu"), OptimConfig(lr=1e-3))
    return m


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(EXAMPLES, *INPUT, generator=gen)
    y = torch.randint(0, CLASSES, (EXAMPLES,), generator=gen)
    return [(x[i:i + BATCH], y[i:i + BATCH], y[i:i + BATCH]) for i in range(0, EXAMPLES, BATCH)]


def runner(net, a, b, index, num_stages, sender=None, receiver=None, cls=StageRunner, **kw):
    last = index == num_stages - 1
    return cls(blocks=net.blocks[a:b], output=net.output if last else None, stage_index=index,
               num_stages=num_stages, device=torch.device("cpu"), num_classes=CLASSES,
               sender=sender, receiver=receiver, with_stats=True, **kw)


def summary(result):
    return result.stats.summary([True] * len(result.stats.block_indices))


def test_two_linked_stages_compute_what_one_stage_computes():
    one = model()
    alone = runner(one, 0, 3, 0, 1)
    reference = [alone.train_epoch(1, data(), 4), alone.eval_epoch(1, data(1), 4)]

    two = model()
    link = MemoryLink()
    first, last = runner(two, 0, 2, 0, 2, sender=link), runner(two, 2, 3, 1, 2, receiver=link)
    tr0 = first.train_epoch(1, data(), 4)
    sent = link.bytes
    kinds = [(m.kind, m.seq, None if m.activation is None else m.activation.size(0))
             for m in link.queue]
    # four train batches (the last one partial), then the end marker that counts them
    assert kinds == [(TRAIN, 0, 16), (TRAIN, 1, 16), (TRAIN, 2, 16), (TRAIN, 3, 2),
                     (END_TRAIN, 4, None)]
    tr1 = last.train_epoch(1, None, 4)
    assert not link.queue
    first.eval_epoch(1, data(1), 4)
    assert link.queue[0].kind == EVAL
    te1 = last.eval_epoch(1, None, 4)

    assert model_digest(two) == model_digest(one)  # the invariant, in one process
    for mine, ref in ((tr1, reference[0]), (te1, reference[1])):
        glob, ref_glob = summary(mine)[0], summary(ref)[0]
        assert [glob[k] for k in ("loss_global", "error", "num_examples")] == \
            [ref_glob[k] for k in ("loss_global", "error", "num_examples")]
        assert summary(mine)[1] == summary(ref)[1][2:]  # the last stage's block
    assert summary(tr0)[1] == summary(reference[0])[1][:2]  # the first stage's blocks
    assert (tr1.times.batches, tr1.times.samples, tr1.stats.count) == (4, EXAMPLES, EXAMPLES)
    assert tr0.times.bytes_sent == sent == EXAMPLES * 24 * 4  # 24 fp32 features per example

    first.stop()
    assert [m.kind for m in link.queue] == [STOP]
    last.stop()
    assert not link.queue


@pytest.mark.parametrize("objective", ["infopro", "dgl"])
def test_local_modules_on_two_linked_stages_compute_what_one_stage_computes(objective):
    """resnet8 in 3 local modules (2 with heads; the last one trained with the output): the
    first stage sends the network's input along where the next stage's objective reads it
    (InfoPro reconstructs it), and the two stages compute the one-stage bits."""
    def net():
        m = build_model(ModelConfig(name="resnet8", feat_mult=0.25),
                        LossConfig(loss_sup=objective, local_modules="3"), INPUT, CLASSES, seed=5)
        for unit in m.units():
            unit.setup(torch.device("cpu"), OptimConfig(lr=1e-3))
        return m
    one = net()
    assert len(one.blocks) == 2
    alone = runner(one, 0, 2, 0, 1)
    reference = [alone.train_epoch(1, data(), 4), alone.eval_epoch(1, data(1), 4)]
    two = net()
    reads = two.blocks[1].needs_input
    assert reads == (objective == "infopro")
    link = MemoryLink(side_shape=INPUT if reads else None)
    first, last = runner(two, 0, 1, 0, 2, sender=link), runner(two, 1, 2, 1, 2, receiver=link)
    first.train_epoch(1, data(), 4)
    sides = [m.side for m in link.queue if m.kind == TRAIN]
    if reads:
        assert all(torch.equal(s, b[0]) for s, b in zip(sides, data()))
    else:
        assert sides == [None] * 4
    tr1 = last.train_epoch(1, None, 4)
    first.eval_epoch(1, data(1), 4)
    te1 = last.eval_epoch(1, None, 4)
    assert model_digest(two) == model_digest(one)
    keys = ("loss_global", "error", "num_examples")
    for mine, ref in ((tr1, reference[0]), (te1, reference[1])):
        assert [summary(mine)[0][k] for k in keys] == [summary(ref)[0][k] for k in keys]
        assert summary(mine)[1] == summary(ref)[1][1:]  # the last stage's module


def test_a_resumed_epoch_starts_at_its_batch_and_keeps_its_statistics():
    whole_net = model()
    saved = []
    whole = runner(whole_net, 0, 3, 0, 1).train_epoch(
        1, data(), 4, checkpoint_every=2, on_checkpoint=lambda e, n, st: saved.append((e, n)))
    assert saved == [(1, 2)]  # not after the last batch: the epoch-end checkpoint covers it
    net = model()
    resumed = runner(net, 0, 3, 0, 1)
    head = resumed.train_epoch(1, data()[:2], 4)
    tail = resumed.train_epoch(1, data()[2:], 4, start_seq=2, initial={
        "blocks": head.stats.blocks, "glob": head.stats.glob, "count": head.stats.count})
    assert model_digest(net) == model_digest(whole_net)
    assert summary(tail) == summary(whole)
    assert (tail.times.batches, tail.stats.count) == (2, EXAMPLES)


def test_a_message_of_another_stream_is_a_stage_failure():
    link = MemoryLink()
    link.send(EVAL, 1, 0, torch.zeros(2, 24), torch.zeros(2, dtype=torch.long))
    last = runner(model(), 2, 3, 1, 2, receiver=link)
    with pytest.raises(StageFailure, match="expected a train batch of epoch 1, got a eval batch"):
        last.train_epoch(1, None, 1)


def test_the_global_runner_overrides_the_step_only():
    net = model(backprop=True)
    result = runner(net, 0, 3, 0, 1, cls=GlobalRunner, mode=RunMode.BACKPROP).train_epoch(
        1, data(), 4)
    assert (result.times.batches, result.stats.count) == (4, EXAMPLES)
    assert summary(result)[0]["num_examples"] == EXAMPLES
    assert all(b["loss"] == 0.0 for b in summary(result)[1])  # no local losses


def test_an_error_inside_a_step_names_the_stage_and_the_batch():
    net = model()
    bad = data()
    bad[2] = (torch.zeros(BATCH, 7), bad[2][1], bad[2][2])  # a batch of the wrong width
    with pytest.raises(StageFailure, match=r"stage 1/1 failed at train batch 3 of epoch 1"):
        runner(net, 0, 3, 0, 1).train_epoch(1, bad, 4)
