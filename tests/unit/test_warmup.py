"""The compile warm-up of the set-up leaves every unit exactly as it found it."""
import torch

from localloss_pp.config import LossConfig, ModelConfig, OptimConfig
from localloss_pp.models import build_model, model_digest
from localloss_pp.pipeline.warmup import batch_sizes, warm_compiled


def test_batch_sizes_are_every_size_a_replica_meets():
    assert batch_sizes(128, 4000, 1000, 0, 1) == [128, 32, 104]
    assert batch_sizes(128, 4000, 1000, 1, 2) == [64, 16, 52]
    assert batch_sizes(128, 100, 50, 0, 1) == [100, 50]


def test_warm_up_restores_weights_buffers_grads_and_dropout_streams():
    net = build_model(ModelConfig(name="mlp", num_layers=2, num_hidden=16, dropout=0.2),
                      LossConfig(), (1, 28, 28), 10, seed=1)
    for unit in net.units():
        unit.setup(torch.device("cpu"), OptimConfig())
    blocks = list(net.blocks)
    before = model_digest(net)
    streams = [b.dropout_generator.get_state() for b in blocks]
    seconds = warm_compiled(blocks, 10, [8, 3], torch.device("cpu"), from_data=True,
                            with_stats=True)
    assert seconds > 0
    assert model_digest(net) == before  # BatchNorm running statistics included
    assert all(torch.equal(s, b.dropout_generator.get_state()) for s, b in zip(streams, blocks))
    assert all(p.grad is None for b in blocks for p in b.parameters())
    assert all(b.training for b in blocks)
