import torch

from localloss_pp.models.blocks import LocalConvBlock, LocalLinearBlock
from localloss_pp.config import LossConfig, ModelConfig, OptimConfig
from localloss_pp.models.losses import onehot
from localloss_pp.models import build_model
from localloss_pp.pipeline.stage import forwards, local_updates
from tolerances import assert_rounding_close

CPU = torch.device("cpu")


def linear_block(dropout=0.0, loss=None, seed=0):
    b = LocalLinearBlock(6, 5, index=0, seed=seed, num_classes=3, loss=loss or LossConfig(),
                         dropout=dropout, nonlin="leakyrelu", first_layer=True)
    b.materialize()
    b.setup(CPU, OptimConfig())
    b.set_lr(1e-3)
    return b


def S(a):  # the adjusted-cosine similarity, written out
    c = a - a.mean(1, keepdim=True)
    n = c / (1e-8 + torch.sqrt((c * c).sum(1, keepdim=True)))
    return (n @ n.t()).clamp(-1, 1)


def test_linear_predsim_step_equals_hand_written_reference():
    block = linear_block()
    with torch.no_grad():  # a non-zero decoder so that every parameter gets a gradient
        block.decoder_y.weight.normal_()
    p = {n: t.detach().clone().requires_grad_() for n, t in block.named_parameters()}
    x = torch.randn(8, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    Y = onehot(y, 3)

    z = x @ p["encoder.weight"].t() + p["encoder.bias"]
    mu, var = z.mean(0), z.var(0, unbiased=False)
    zn = (z - mu) / torch.sqrt(var + 1e-5) * p["bn.weight"] + p["bn.bias"]
    h = torch.where(zn > 0, zn, 0.01 * zn)
    lsim = ((S(h @ p["linear_loss.weight"].t()) - S(Y)) ** 2).mean()
    logits = h @ p["decoder_y.weight"].t() + p["decoder_y.bias"]
    lpred = -(logits.log_softmax(1)[torch.arange(8), y]).mean()
    loss = 0.01 * lpred + 0.99 * lsim
    grads = torch.autograd.grad(loss, list(p.values()))
    # Adam, first step: m_hat = g, v_hat = g^2  ->  p - lr * g / (|g| + eps)
    expected = {n: (t - 1e-3 * g / (g.abs() + 1e-8)).detach() for (n, t), g in zip(p.items(), grads)}

    out, ctx = block.train_forward(x)
    stats = block.train_update(ctx, y, Y)
    # the block's fused kernels against the formula written out: equal up to fp32 rounding.
    # The output sums 6 products, then BatchNorm sums over the batch of 8 (depth 2); the losses
    # add the heads, the 8 x 8 similarity matrices and their mean over 64 entries (depth 4)
    assert_rounding_close(out, h.detach(), terms=8, depth=2)
    assert_rounding_close(stats[:3], torch.stack([loss, 0.99 * lsim, 0.01 * lpred]).detach(),
                          terms=64, depth=4)
    assert stats[3].item() == (logits.argmax(1) == y).sum().item()
    for name, param in block.named_parameters():
        if name == "encoder.bias":  # BN cancels it: its gradient is rounding noise around 0
            assert (param - p[name]).abs().max() <= 1e-3 + 1e-7
            continue
        # Adam's first step moves a weight by lr * g / (|g| + 1e-8), +-1e-3 whatever the
        # rounding of g (unless |g| is near 1e-8: the bias above), so the weights agree to
        # the rounding of w +- 1e-3, far inside 1e-6
        assert torch.allclose(param, expected[name], rtol=0, atol=1e-6), name
    # the running statistics: batch means and variances of z, 8 terms each, then one update
    assert_rounding_close(block.bn.running_mean, 0.1 * mu.detach(), terms=8, depth=2)
    assert_rounding_close(block.bn.running_var, 0.9 + 0.1 * z.var(0).detach(), terms=8,
                          depth=2)
    assert all(t.grad is None for t in block.parameters())  # zeroed after the step


def test_local_losses_read_the_pre_dropout_activation():
    x = torch.randn(16, 6)
    y = torch.arange(16) % 3
    plain, dropped = linear_block(0.0), linear_block(0.5)
    out_a, ctx_a = plain.train_forward(x)
    out_b, ctx_b = dropped.train_forward(x)
    assert not torch.equal(out_a, out_b)  # the next block sees the dropped-out output
    sa = plain.train_update(ctx_a, y, onehot(y, 3))
    sb = dropped.train_update(ctx_b, y, onehot(y, 3))
    assert torch.equal(sa, sb)
    for pa, pb in zip(plain.parameters(), dropped.parameters()):
        assert torch.equal(pa, pb)


def test_dropout_masks_come_from_the_block_generator():
    x = torch.randn(64, 6)
    a, b = linear_block(0.5), linear_block(0.5)
    torch.manual_seed(123)
    oa = a.train_forward(x)[0]
    torch.manual_seed(999)  # the global generator does not matter
    ob = b.train_forward(x)[0]
    assert torch.equal(oa, ob)
    assert not torch.equal(oa, a.train_forward(x)[0])  # the stream advances


def test_first_pred_step_sends_no_gradient_into_the_layer():
    block = linear_block(loss=LossConfig(loss_sup="pred"))
    before = block.encoder.weight.detach().clone()
    dec_before = block.decoder_y.bias.detach().clone()
    x, y = torch.randn(8, 6), torch.arange(8) % 3
    _, ctx = block.train_forward(x)
    block.train_update(ctx, y, onehot(y, 3))
    assert torch.equal(block.encoder.weight, before)  # the decoder weight was zero
    assert not torch.equal(block.decoder_y.bias, dec_before)


def test_bio_conv_block_keeps_its_fixed_matrices():
    loss = LossConfig(bio=True, beta=0.01)
    block = LocalConvBlock(3, 8, kernel_size=3, stride=1, padding=1, dim_out=8,
                           dim_in_decoder=64, index=2, seed=1, num_classes=4, loss=loss,
                           dropout=0.1, nonlin="relu", first_layer=False)
    block.materialize()
    block.setup(CPU, OptimConfig())
    block.set_lr(1e-2)
    fb, proj = block.decoder_y.feedback.clone(), block.proj_y.clone()
    w0 = block.encoder.weight.detach().clone()
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10) % 4
    for _ in range(3):
        _, ctx = block.train_forward(x)
        stats = block.train_update(ctx, y, onehot(y, 4))
    assert torch.equal(block.decoder_y.feedback, fb) and torch.equal(block.proj_y, proj)
    assert not torch.equal(block.encoder.weight, w0) and torch.isfinite(stats).all()
    assert block.decoder_y.weight.shape == (128, 8 * 2 * 4)


def test_run_of_blocks_equals_block_by_block_reference_order():
    cfg = ModelConfig(name="vgg8b", feat_mult=0.0625, dropout=0.1, dim_in_decoder=256)
    a = build_model(cfg, LossConfig(), (1, 28, 28), 10, seed=3)
    b = build_model(cfg, LossConfig(), (1, 28, 28), 10, seed=3)
    for unit in a.units() + b.units():
        unit.setup(CPU, OptimConfig())
        unit.set_lr(1e-3)
    x, y = torch.randn(6, 1, 28, 28), torch.arange(6) % 10
    Y = onehot(y, 10)
    for _ in range(2):
        out_a, ctxs = forwards(a.blocks, x)  # forwards, then updates
        stats_a, _ = local_updates(a.blocks, ctxs, out_a, y, Y)
        h, stats_b = x, []
        for block in b.blocks:  # the reference: forward, update, next block
            h, ctx = block.train_forward(h)
            stats_b.append(block.train_update(ctx, y, Y))
        assert torch.equal(out_a, h)
        assert all(torch.equal(s, t) for s, t in zip(stats_a, stats_b))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_backprop_and_nodetach_steps_reach_earlier_blocks():
    from localloss_pp.pipeline.globalmode import global_step
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    Y = onehot(y, 10)
    cfg = ModelConfig(name="mlp", num_layers=2, num_hidden=32)
    results = {}
    for mode, loss in (("local", LossConfig()), ("nodetach", LossConfig(detach=False)),
                       ("backprop", LossConfig(backprop=True))):
        m = build_model(cfg, loss, (1, 28, 28), 10, seed=0)
        for unit in m.units():
            unit.setup(CPU, OptimConfig())
            unit.set_lr(1e-3)
        if mode == "local":
            h, ctxs = forwards(m.blocks, x)
            local_updates(m.blocks, ctxs, h, y, Y)
            m.output.train_update(h, y)
        else:
            global_step(m.blocks, m.output, x, y, Y, mode)
        results[mode] = m
    w = {k: m.blocks[0].encoder.weight for k, m in results.items()}
    assert not torch.equal(w["local"], w["nodetach"])  # later losses flow into block 0
    assert not torch.equal(w["local"], w["backprop"])
    # backprop: output weight starts at default init (not zero), and F.cross_entropy unscaled
    assert torch.count_nonzero(results["backprop"].output.linear.weight) > 0
    assert results["backprop"].output.loss_scale == 1.0
    assert abs(results["local"].output.loss_scale - 0.01) < 1e-12  # predsim: (1 - beta)
