"""Vision Transformers as pipeline units: parameter counts against a hand count, local losses
on tokens, compile without graph breaks, bf16, and the unit protocol's train and eval paths."""
import pytest
import torch

from localloss_pp.config import LossConfig, ModelConfig, OptimConfig
from localloss_pp.models import build_model, count_params, model_digest
from localloss_pp.models.losses import onehot
from localloss_pp.models.vit import parse_vit

MNIST = (1, 28, 28)


def hand_count(depth, dim, patch, mlp_ratio, head_in, size=28, channels=1, classes=10):
    """`head_in`: what the output layer's linear classifier reads, the tokens' grid pooled to at
    most --dim-in-decoder (4096 by default) values (worked out by hand in the table below)."""
    tokens = (size // patch) ** 2
    embed = channels * patch * patch * dim + dim + tokens * dim  # conv, bias, positions
    block = (2 * 2 * dim                       # two LayerNorms
             + dim * 3 * dim + 3 * dim         # qkv
             + dim * dim + dim                 # attention output projection
             + dim * mlp_ratio * dim + mlp_ratio * dim + mlp_ratio * dim * dim + dim)  # MLP
    head = 2 * dim + head_in * classes + classes   # LayerNorm, linear classifier
    return embed + depth * block + head


@pytest.mark.parametrize("name,depth,dim,patch,ratio,head_in", [
    ("vit-3-16-p7", 3, 16, 7, 4, 16 * 4 * 4),  # a 4x4 grid of 16 channels, unpooled
    ("vit-nano", 4, 32, 7, 4, 32 * 4 * 4),
    ("vit-micro", 6, 64, 4, 4, 64 * 7 * 7),    # 3136 <= 4096: unpooled
    ("vit-2-24-p4-h3-m2", 2, 24, 4, 2, 24 * 7 * 7)])
def test_parameter_counts_match_a_hand_count(name, depth, dim, patch, ratio, head_in):
    assert count_params(ModelConfig(name=name), MNIST, 10) == \
        hand_count(depth, dim, patch, ratio, head_in)


def test_vit_tiny_on_cifar_sized_images_matches_a_hand_count():
    # an 8x8 grid of 192 channels (12288 values): pooled 2x1 (6144), then 2x2 -> 4x4 = 3072
    assert count_params(ModelConfig(name="vit-tiny"), (3, 32, 32), 10) == \
        hand_count(12, 192, 4, 4, 192 * 4 * 4, size=32, channels=3)


def test_names_and_presets():
    spec = parse_vit("vit-tiny")
    assert (spec.depth, spec.dim, spec.patch, spec.heads, spec.mlp_ratio) == (12, 192, 4, 3, 4)
    spec = parse_vit("vit-6-128")
    assert (spec.patch, spec.heads, spec.mlp_ratio) == (4, 2, 4)  # defaults: heads = dim / 64
    for bad in ("vit", "vit-6", "vit-0-64", "vit-6-64-x2", "vit-2-30-h4"):
        with pytest.raises(ValueError, match="vit"):
            parse_vit(bad)


def _net(loss, name="vit-3-16-p7", precision="fp32"):
    net = build_model(ModelConfig(name=name, dropout=0.1), loss, MNIST, 10, seed=3)
    for unit in net.units():
        unit.setup(torch.device("cpu"), OptimConfig(lr=1e-3), precision=precision)
        unit.set_lr(1e-3)  # (the optimizers start at 0; the trainer sets it every epoch)
    return net


@pytest.mark.parametrize("loss", [LossConfig(), LossConfig(loss_sup="pred"),
                                  LossConfig(loss_sup="sim"), LossConfig(bio=True),
                                  LossConfig(loss_unsup="sim", alpha=0.5)],
                         ids=["predsim", "pred", "sim", "bio", "unsup-sim"])
def test_every_unit_learns_from_its_own_loss_on_tokens(loss):
    net = _net(loss)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, *MNIST, generator=gen), torch.randint(10, (12,), generator=gen)
    y1h = onehot(y, 10)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in net.blocks]
    h = x
    for block, state in zip(net.blocks, before):
        assert block.in_shape == tuple(h.shape[1:])
        h_next, ctx = block.train_forward(h)
        assert h_next.shape == (12, 16, 16) and not h_next.requires_grad  # 16 tokens of 16
        stats = block.train_update(ctx, y, y1h)
        assert torch.isfinite(stats).all() and stats[0] > 0
        # a second step: the zero-initialised decoder passes no gradient in the first one
        block.train_update(block.train_forward(h)[1], y, y1h)
        encoder = [k for k in state if not k.startswith(("decoder", "linear_loss", "head"))]
        assert any(not torch.equal(state[k], block.state_dict()[k]) for k in encoder)
        h = h_next
    logits, _ = net.output.train_update(h, y)
    assert logits.shape == (12, 10)
    with torch.no_grad():  # eval path: the same shapes, stats of the same fields
        out, stats = net.blocks[1].evaluate(net.blocks[0].evaluate(x, y, y1h)[0], y, y1h)
        assert out.shape == (12, 16, 16) and stats.shape == (4,)


def test_backprop_has_no_local_heads_and_trains_end_to_end():
    net = _net(LossConfig(backprop=True))
    assert not any(hasattr(b, "decoder_y") or b.head_norm is not None for b in net.blocks)
    x, y = torch.randn(6, *MNIST), torch.randint(10, (6,))
    loss = net.output.loss(net(x), y)
    loss.backward()
    assert all(p.grad is not None for b in net.blocks for p in b.parameters())


def test_a_transformer_block_compiles_without_graph_breaks():
    net = _net(LossConfig())
    block = net.blocks[1]
    x = torch.randn(8, 16, 16)
    y = torch.randint(10, (8,))
    explained = torch._dynamo.explain(block.encode)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    h = block.encode(x)
    explained = torch._dynamo.explain(block.local_loss)((x, h), y, onehot(y, 10))
    assert explained.graph_break_count == 0, explained.break_reasons


def test_bf16_tokens_and_fp32_weights():
    net = _net(LossConfig(), precision="bf16")
    x, y = torch.randn(6, *MNIST), torch.randint(10, (6,))
    h, ctx = net.blocks[0].train_forward(x)
    assert h.dtype == torch.bfloat16
    stats = net.blocks[0].train_update(ctx, y, onehot(y, 10))
    assert torch.isfinite(stats).all()
    assert all(p.dtype == torch.float32 for p in net.blocks[0].parameters())


def test_the_same_seed_builds_the_same_vit():
    a, b = _net(LossConfig()), _net(LossConfig())
    assert model_digest(a) == model_digest(b)
