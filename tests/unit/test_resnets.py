"""ResNets and Wide-ResNets (docs/algorithm.md 5.5): the paper-sense parameter counts of the
reference, the reference's bugs fixed, and every training mode on a unit of each kind."""
import pytest
import torch

from localloss_pp.config import LossConfig, ModelConfig, OptimConfig, RunMode, build_config
from localloss_pp.data.datasets import DATASETS
from localloss_pp.pipeline.globalmode import global_step
from localloss_pp.models.losses import onehot
from localloss_pp.models import build_model, count_params, model_digest, resolve_model
from localloss_pp.pipeline.stage import forwards, local_updates

CPU = torch.device("cpu")

# measured on the reference code (the backprop-mode model, BN affine included)
RESNET_COUNTS = [
    ("resnet18", "CIFAR10", 1, 11173962), ("resnet18", "MNIST", 1, 11172810),
    ("resnet18", "CIFAR10", 0.25, 701466), ("resnet34", "CIFAR10", 1, 21282122),
    ("resnet50", "CIFAR10", 1, 23520842), ("resnet101", "CIFAR100", 1, 42697380),
    ("resnet152", "STL10", 1, 58156618), ("wresnet10-8", "CIFAR10", 1, 4767370),
    ("wresnet10-8a", "CIFAR10", 1, 4974602), ("wresnet16-4", "CIFAR10", 1, 2751178),
    ("wresnet16-4a", "CIFAR10", 1, 2817674), ("wresnet16-8", "CIFAR100", 1, 11012068),
    ("wresnet28-10", "CIFAR10", 1, 36489322), ("wresnet28-10a", "CIFAR10", 1, 36794570),
    ("wresnet40-10", "CIFAR10", 1, 55856362),
]


@pytest.mark.parametrize("model,dataset,fm,expected", RESNET_COUNTS)
def test_reference_parameter_counts(model, dataset, fm, expected):
    info = DATASETS[dataset]
    cfg = ModelConfig(name=model, feat_mult=fm)
    assert count_params(cfg, info.input_shape, info.num_classes) == expected


def tiny(name, loss=None, shape=(3, 32, 32), **model):
    model = dict(dict(feat_mult=0.0625, dropout=0.1, dim_in_decoder=256), **model)
    net = build_model(ModelConfig(name=name, **model), loss or LossConfig(), shape, 10, seed=3)
    for unit in net.units():
        unit.setup(CPU, OptimConfig())
        unit.set_lr(1e-3)
    return net


def batch(n=8, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 10
    return torch.randn(n, *shape, generator=g), y, onehot(y, 10)


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet34", marks=pytest.mark.slow),
                                  "resnet50"])
@pytest.mark.parametrize("loss_sup", ["pred", "predsim"])
def test_pred_losses_train_every_resnet_unit(name, loss_sup):
    # the reference sizes BasicBlock's first strided conv's decoder for the input resolution:
    # pred/predsim crash there on resnet18/34; here every decoder fits its conv's real map
    net = tiny(name, LossConfig(loss_sup=loss_sup))
    x, y, y1h = batch()
    w0 = [u.convs[-1].decoder_y.weight.clone() for u in net.blocks]
    out, ctxs = forwards(net.blocks, x)
    for unit, ctx in zip(net.blocks, ctxs):
        for conv, (_, h) in zip(unit.convs, ctx):
            assert h.shape[-1] == conv.dim_out
    stats, (logits, _) = local_updates(net.blocks, ctxs, out, y, y1h, net.output)
    assert logits.shape == (8, 10) and all(torch.isfinite(s).all() for s in stats)
    assert all(not torch.equal(w, u.convs[-1].decoder_y.weight) for w, u in zip(w0, net.blocks))


def test_resnet_units_are_whole_residual_blocks():
    net = tiny("resnet18")
    assert [u.describe() for u in net.blocks] == [
        "Stem(3->4)@32", "BasicBlock(4->4)@32", "BasicBlock(4->4)@32",
        "BasicBlock(4->8)/2@16", "BasicBlock(8->8)@16", "BasicBlock(8->16)/2@8",
        "BasicBlock(16->16)@8", "BasicBlock(16->32)/2@4", "BasicBlock(32->32)@4"]
    # a projection shortcut where the shape changes, with its own parameters in the unit
    assert net.blocks[3].shortcut is not None and net.blocks[2].shortcut is None
    assert net.blocks[-1].out_shape == (32, 1, 1)  # pooled before it travels on
    bottleneck = tiny("resnet50")
    assert len(bottleneck.blocks[1].convs) == 3 and bottleneck.blocks[1].convs[2].ch_out == 16


def test_projection_shortcut_learns_from_the_last_convs_loss():
    net = tiny("resnet18")
    x, y, y1h = batch()
    unit = net.blocks[3]
    before = [p.clone() for p in unit.shortcut.parameters()]
    h = net.blocks[2].train_forward(net.blocks[1].train_forward(
        net.blocks[0].train_forward(x)[0])[0])[0]
    out, ctx = unit.train_forward(h)
    unit.train_update(ctx, y, y1h)
    assert all(not torch.equal(b, p) for b, p in zip(before, unit.shortcut.parameters()))


@pytest.mark.parametrize("name", ["resnet18", "wresnet10-1", "wresnet10-1a"])
@pytest.mark.parametrize("mode", [RunMode.BACKPROP, RunMode.NODETACH])
def test_global_modes_train_resnets(name, mode):
    loss = LossConfig(backprop=mode == RunMode.BACKPROP, detach=mode != RunMode.NODETACH)
    net = tiny(name, loss, feat_mult=0.25 if name.startswith("w") else 0.0625)
    x, y, y1h = batch()
    w0 = net.blocks[0].convs[0].encoder.weight.clone()
    stats, (logits, gloss) = global_step(net.blocks, net.output, x, y, y1h, mode)
    assert torch.isfinite(gloss) and logits.shape == (8, 10)
    assert len(stats) == (0 if mode == RunMode.BACKPROP else len(net.blocks))
    assert not torch.equal(w0, net.blocks[0].convs[0].encoder.weight)


def test_pre_act_resnet_and_its_refusal_elsewhere():
    plain, pre = tiny("resnet18"), tiny("resnet18", pre_act=True)
    assert not plain.blocks[1].convs[0].pre_act and pre.blocks[1].convs[0].pre_act
    assert pre.blocks[1].convs[0].bn_pre is not None
    x, y, y1h = batch()
    out, ctxs = forwards(pre.blocks, x)
    local_updates(pre.blocks, ctxs, out, y, y1h, pre.output)
    # backprop-mode counts differ: a pre-activation conv has its BN before it
    info = DATASETS["CIFAR10"]
    assert count_params(ModelConfig(name="resnet18", pre_act=True), info.input_shape, 10) != \
        count_params(ModelConfig(name="resnet18"), info.input_shape, 10)
    for name in ("vgg8b", "mlp", "wresnet16-4"):
        with pytest.raises(ValueError, match="--pre-act chooses the pre-activation ResNet"):
            cfg = build_config(cli_values={"model": {"name": name, "pre_act": True}})
            resolve_model(cfg.model)


def test_pre_act_bottlenecks_are_pre_activation_a_stated_difference():
    """The reference's Bottleneck ignores --pre-act (only its stem changes); here every conv
    of a bottleneck block is pre-activation, as in the basic blocks (docs/algorithm.md 9)."""
    net = tiny("resnet50", pre_act=True)
    stem = net.blocks[0].convs[0]
    assert not stem.pre_act and not stem.post_act  # as the reference: neither
    for unit in net.blocks[1:]:
        assert len(unit.convs) == 3
        assert all(c.pre_act and not c.post_act and c.bn_pre is not None for c in unit.convs)
    plain = tiny("resnet50")
    assert all(not c.pre_act and c.post_act for u in plain.blocks[1:] for c in u.convs)


def test_bottleneck_decoders_fit_the_real_map_on_28x28_inputs():
    """The reference sizes a conv's decoder from the input size floor-divided by the stride so
    far: 28 // 8 = 3 where the map of the last stage is 4x4 (7 -> 4 with stride 2, padding 1),
    so pred and predsim crash on resnet50 with MNIST-size inputs. Here the size is computed
    from the convolution itself."""
    net = tiny("resnet50", shape=(1, 28, 28))
    assert [u.describe().rsplit("@", 1)[1] for u in net.blocks][-4:] == ["7", "4", "4", "4"]
    x, y, y1h = batch(shape=(1, 28, 28))
    out, ctxs = forwards(net.blocks, x)
    stats, (logits, _) = local_updates(net.blocks, ctxs, out, y, y1h, net.output)
    assert logits.shape == (8, 10) and all(torch.isfinite(s).all() for s in stats)


def test_wide_resnet_head_batchnorm_is_trained_in_local_mode():
    net = tiny("wresnet10-1", feat_mult=0.25)
    x, y, y1h = batch()
    gamma = net.output.bn.weight.clone()
    for _ in range(2):  # (the zero-initialised linear layer passes no gradient at step 1)
        out, ctxs = forwards(net.blocks, x)
        local_updates(net.blocks, ctxs, out, y, y1h, net.output)
    assert not torch.equal(gamma, net.output.bn.weight)  # the reference never trains it
    assert net.output.bn.momentum == 0.9


def test_wide_resnet_dropout_placement():
    plain, adapted = tiny("wresnet10-2", feat_mult=0.25), tiny("wresnet10-2a", feat_mult=0.25)
    # plain: element-wise dropout between the two convs; adapted: Dropout2d before each conv
    assert plain.blocks[1].mid_dropout == 0.1
    assert [c.dropout_p for c in plain.blocks[1].convs] == [0.0, 0.0]
    assert adapted.blocks[1].mid_dropout == 0.0
    assert [c.dropout_p for c in adapted.blocks[1].convs] == [0.1, 0.1]
    assert plain.blocks[0].convs[0].ch_out == 4 and adapted.blocks[0].convs[0].ch_out == 8
    assert adapted.output.linear.in_features == 32 * 16  # max-pool 2 of the 8x8 map


@pytest.mark.parametrize("bad", ["wresnet12-4", "wresnet16", "wresnet16-0"])
def test_wide_resnet_names_are_checked(bad):
    with pytest.raises(ValueError, match="Wide-ResNet"):
        resolve_model(build_config(cli_values={"model": {"name": bad}}).model)


def test_units_are_seeded_by_their_index():
    a, b = tiny("resnet18"), tiny("resnet18")
    assert model_digest(a) == model_digest(b)
    unit = a.blocks[1]
    assert not torch.equal(unit.convs[0].encoder.weight, unit.convs[1].encoder.weight)


def cifar_resnet_params(depth: int, channels: int, num_classes: int) -> int:
    """The CIFAR ResNet's parameter count by hand: a 3x3 stem of 16 channels with BN, three
    groups of n = (depth - 2) / 6 basic blocks (two 3x3 convs with BN each) of 16, 32 and 64
    channels, a 1x1 conv + BN shortcut where the width changes, one linear layer."""
    n = (depth - 2) // 6
    conv_bn = lambda c_in, c_out, k: k * k * c_in * c_out + 2 * c_out  # noqa: E731
    total = conv_bn(channels, 16, 3)
    for c_in, c in ((16, 16), (16, 32), (32, 64)):
        total += conv_bn(c_in, c, 3) + conv_bn(c, c, 3) + (conv_bn(c_in, c, 1) if c_in != c else 0)
        total += (n - 1) * 2 * conv_bn(c, c, 3)
    return total + 64 * num_classes + num_classes


@pytest.mark.parametrize("depth", [8, 20, 32, 44, 56, 110])
@pytest.mark.parametrize("dataset", ["CIFAR10", "MNIST"])
def test_cifar_resnet_parameter_counts_follow_the_hand_formula(depth, dataset):
    info = DATASETS[dataset]
    expected = cifar_resnet_params(depth, info.input_shape[0], info.num_classes)
    assert count_params(ModelConfig(name=f"resnet{depth}"), info.input_shape,
                        info.num_classes) == expected


def test_cifar_resnet_units_and_the_papers_sizes():
    # He et al. 2016, table 6: ResNet-32 0.46 M, ResNet-110 1.7 M parameters on CIFAR-10
    assert round(cifar_resnet_params(32, 3, 10) / 1e6, 2) in (0.46, 0.47)
    assert round(cifar_resnet_params(110, 3, 10) / 1e6, 1) == 1.7
    net = tiny("resnet20", feat_mult=1.0)
    assert len(net.blocks) == 10  # the stem and 3 x 3 basic blocks
    assert [u.describe() for u in net.blocks[:5]] == [
        "Stem(3->16)@32", "BasicBlock(16->16)@32", "BasicBlock(16->16)@32",
        "BasicBlock(16->16)@32", "BasicBlock(16->32)/2@16"]
    assert net.blocks[-1].out_shape == (64, 1, 1)
    # resnet50 and resnet152 are 6n + 2 too, but stay the reference's bottleneck networks
    assert len(tiny("resnet50").blocks[1].convs) == 3


@pytest.mark.parametrize("bad", ["resnet33", "resnet2", "resnet"])
def test_cifar_resnet_names_are_checked(bad):
    with pytest.raises(ValueError, match="resnet<6n\\+2>"):
        resolve_model(ModelConfig(name=bad))
