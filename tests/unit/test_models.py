import pytest
import torch

from localloss_pp.models.blocks import decoder_pool
from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.data.datasets import DATASETS
from localloss_pp.models import build_model, count_params, model_digest

# docs/algorithm.md section 5.3: (model, dataset, feat-mult, num-layers, num-hidden, count)
PARAM_COUNTS = [
    ("mlp", "MNIST", 1, 3, 1024, 2_919_434),
    ("mlp", "FashionMNIST", 1, 3, 1024, 2_919_434),
    ("mlp", "CIFAR10", 1, 3, 3000, 27_273_010),
    ("mlp", "CIFAR100", 1, 3, 3000, 27_543_100),
    ("vgg8b", "MNIST", 1, 1, 1024, 7_328_266),
    ("vgg8b", "FashionMNIST", 2, 1, 1024, 28_209_162),
    ("vgg8b", "CIFAR10", 1, 1, 1024, 8_903_434),
    ("vgg8b", "SVHN", 1, 1, 1024, 8_903_434),
    ("vgg8b", "CIFAR100", 1, 1, 1024, 8_995_684),
    ("vgg8b", "STL10", 1, 1, 1024, 11_540_234),
    ("vgg11b", "CIFAR10", 1, 1, 1024, 11_559_946),
    ("vgg11b", "CIFAR100", 1, 1, 1024, 11_652_196),
    ("vgg11b", "CIFAR10", 2, 1, 1024, 41_980_938),
    ("vgg11b", "CIFAR100", 2, 1, 1024, 42_073_188),
    ("vgg11b", "CIFAR10", 3, 1, 1024, 91_276_298),
    ("vgg11b", "CIFAR100", 3, 1, 1024, 91_368_548),
]


@pytest.mark.parametrize("model,dataset,fm,nl,nh,expected", PARAM_COUNTS)
def test_paper_parameter_counts(model, dataset, fm, nl, nh, expected):
    info = DATASETS[dataset]
    cfg = ModelConfig(name=model, feat_mult=fm, num_layers=nl, num_hidden=nh)
    assert count_params(cfg, info.input_shape, info.num_classes) == expected


def test_vgg8b_cifar10_per_layer_counts():
    info = DATASETS["CIFAR10"]
    net = build_model(ModelConfig(name="vgg8b"), LossConfig(backprop=True), info.input_shape, 10, 0)
    per_unit = [sum(p.numel() for p in u.parameters()) for u in net.units()]
    assert per_unit == [3840, 295680, 590592, 1181184, 2360832, 2360832, 2100224, 10250]


# docs/algorithm.md appendix A: (channels, map size, dim-in-decoder) -> (kernel, padding, pooled, d)
POOLS = [
    # vgg8b CIFAR-10 / SVHN, 2048
    (128, 32, 2048, (8, 8), (0, 0), (4, 4), 2048), (256, 32, 2048, (16, 8), (0, 0), (2, 4), 2048),
    (256, 16, 2048, (8, 4), (0, 0), (2, 4), 2048), (512, 16, 2048, (8, 8), (0, 0), (2, 2), 2048),
    (512, 8, 2048, (4, 4), (0, 0), (2, 2), 2048), (512, 4, 2048, (2, 2), (0, 0), (2, 2), 2048),
    # vgg8b CIFAR, 4096
    (128, 32, 4096, (8, 4), (0, 0), (4, 8), 4096), (256, 32, 4096, (8, 8), (0, 0), (4, 4), 4096),
    (256, 16, 4096, (4, 4), (0, 0), (4, 4), 4096), (512, 16, 4096, (8, 4), (0, 0), (2, 4), 4096),
    (512, 8, 4096, (4, 2), (0, 0), (2, 4), 4096), (512, 4, 4096, (2, 1), (0, 0), (2, 4), 4096),
    # vgg8b MNIST-type, 1024
    (128, 28, 1024, (16, 8), (8, 4), (2, 4), 1024), (256, 28, 1024, (16, 16), (8, 8), (2, 2), 1024),
    (256, 14, 1024, (8, 8), (4, 4), (2, 2), 1024), (512, 14, 1024, (16, 8), (8, 4), (1, 2), 1024),
    (512, 7, 1024, (8, 4), (4, 2), (1, 2), 1024), (512, 3, 1024, (4, 2), (2, 1), (1, 2), 1024),
    # vgg11b x3, 4096
    (384, 32, 4096, (16, 8), (0, 0), (2, 4), 3072), (768, 32, 4096, (16, 16), (0, 0), (2, 2), 3072),
    (768, 16, 4096, (8, 8), (0, 0), (2, 2), 3072), (1536, 16, 4096, (16, 8), (0, 0), (1, 2), 3072),
    (1536, 8, 4096, (8, 4), (0, 0), (1, 2), 3072), (1536, 4, 4096, (4, 2), (0, 0), (1, 2), 3072),
    # vgg8b STL-10, 2048
    (128, 48, 2048, (16, 16), (0, 0), (3, 3), 1152), (256, 48, 2048, (32, 16), (16, 0), (2, 3), 1536),
    (256, 24, 2048, (16, 8), (8, 0), (2, 3), 1536), (512, 24, 2048, (16, 16), (8, 8), (2, 2), 2048),
    (512, 12, 2048, (8, 8), (4, 4), (2, 2), 2048), (512, 6, 2048, (4, 4), (2, 2), (2, 2), 2048),
]


@pytest.mark.parametrize("ch,size,target,kernel,padding,pooled,d", POOLS)
def test_decoder_pooling_matches_appendix_a(ch, size, target, kernel, padding, pooled, d):
    pool, oh, ow, dec_in = decoder_pool(ch, size, target)
    assert pool.kernel_size == kernel and pool.stride == kernel and pool.padding == padding
    assert (oh, ow) == pooled and dec_in == d
    out = pool(torch.zeros(1, 1, size, size))  # one channel is enough for the geometry
    assert tuple(out.shape[-2:]) == pooled


def test_no_pool_when_the_map_is_small_enough():
    assert decoder_pool(16, 4, 4096) == (None, 4, 4, 256)


def test_vgg_structure_on_stl10_and_mnist():
    loss = LossConfig()
    stl = build_model(ModelConfig(name="vgg8b", feat_mult=0.125, dim_in_decoder=2048), loss,
                      (3, 96, 96), 10, 0)
    first = stl.blocks[0].encoder
    assert first.kernel_size == (7, 7) and first.stride == (2, 2) and first.padding == (3, 3)
    assert [b.dim_out for b in stl.blocks[:6]] == [48, 48, 24, 24, 12, 6]
    assert stl.blocks[6].num_in == 3 * 3 * 64
    mnist = build_model(ModelConfig(name="vgg8b", feat_mult=0.125), loss, (1, 28, 28), 10, 0)
    assert [b.dim_out for b in mnist.blocks[:6]] == [28, 28, 14, 14, 7, 3]
    out = mnist(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)
    # local mode: pred decoders and the output weight start at zero, biases do not
    for block in mnist.blocks:
        assert torch.count_nonzero(block.decoder_y.weight) == 0
        assert torch.count_nonzero(block.decoder_y.bias) > 0
    assert torch.count_nonzero(mnist.output.linear.weight) == 0
    # num_layers 0: a plain, non-zeroed linear head after the convs
    plain = build_model(ModelConfig(name="vgg8b", feat_mult=0.125, num_layers=0), loss,
                        (1, 28, 28), 10, 0)
    assert len(plain.blocks) == 6 and torch.count_nonzero(plain.output.linear.weight) > 0


def test_blocks_are_seeded_per_index_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a = build_model(ModelConfig(name="mlp", num_layers=3, num_hidden=64), LossConfig(),
                    (1, 28, 28), 10, seed=5)
    b = build_model(ModelConfig(name="mlp", num_layers=2, num_hidden=64), LossConfig(),
                    (1, 28, 28), 10, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    for i in range(2):  # a block's init does not depend on how many blocks there are
        for (n1, t1), (n2, t2) in zip(a.blocks[i].state_dict().items(),
                                      b.blocks[i].state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2)
    c = build_model(ModelConfig(name="mlp", num_layers=3, num_hidden=64), LossConfig(),
                    (1, 28, 28), 10, seed=6)
    assert model_digest(a) != model_digest(c)
    d = build_model(ModelConfig(name="mlp", num_layers=3, num_hidden=64), LossConfig(),
                    (1, 28, 28), 10, seed=5)
    assert model_digest(a) == model_digest(d)
    assert not torch.equal(a.blocks[1].encoder.weight, a.blocks[2].encoder.weight)


def test_heads_built_per_loss():
    shape = (1, 28, 28)
    cfg = ModelConfig(name="vgg8b", feat_mult=0.125)
    pred = build_model(cfg, LossConfig(loss_sup="pred"), shape, 10, 0).blocks[0]
    assert hasattr(pred, "decoder_y") and not hasattr(pred, "conv_loss")
    sim = build_model(cfg, LossConfig(loss_sup="sim"), shape, 10, 0).blocks[0]
    assert hasattr(sim, "conv_loss") and not hasattr(sim, "decoder_y")
    bio = build_model(cfg, LossConfig(bio=True), shape, 10, 0).blocks[1]
    assert type(bio.decoder_y).__name__ == "LinearFA" and bio.proj_y.shape == (128, 10)
    assert not hasattr(bio, "conv_loss") and "proj_y" not in dict(bio.named_parameters())
    recon = build_model(cfg, LossConfig(loss_unsup="recon"), shape, 10, 0)
    assert not hasattr(recon.blocks[0], "decoder_x") and hasattr(recon.blocks[1], "decoder_x")
    bp = build_model(cfg, LossConfig(backprop=True), shape, 10, 0).blocks[0]
    assert not any(hasattr(bp, n) for n in ("decoder_y", "conv_loss", "proj_y", "avg_pool")) \
        or bp.avg_pool is None


def test_a_registered_builder_that_returns_bad_units_is_a_clear_error():
    from localloss_pp.models import register_model

    @register_model("broken-for-test")
    def build(model, loss, input_shape, num_classes, seed):
        good = build_model(ModelConfig(name="mlp", num_layers=2, num_hidden=8), loss,
                           input_shape, num_classes, seed, materialize=())
        return [good.blocks[0], torch.nn.Linear(3, 3)], good.output

    with pytest.raises(ValueError, match=r"model broken-for-test: unit 1 \(Linear\) lacks "
                                         r"train_forward, local_backward"):
        build_model(ModelConfig(name="broken-for-test"), LossConfig(), (1, 28, 28), 10, 0)
