import math

import pytest
import torch

from localloss_pp.models.blocks import LinearFA
from localloss_pp.models.losses import onehot, pred_bio_loss, sim_loss, similarity_matrix
from tolerances import assert_rounding_close


@pytest.mark.parametrize("num_classes", [10, 100])
def test_label_similarity_target(num_classes):
    y = torch.tensor([0, 1, 1, 2, 0, num_classes - 1])
    r = similarity_matrix(onehot(y, num_classes))
    same = y[:, None] == y[None, :]
    assert torch.allclose(r[same], torch.ones(()), atol=1e-6)
    assert torch.allclose(r[~same], torch.tensor(-1.0 / (num_classes - 1)), atol=1e-6)


def test_similarity_reduces_maps_with_spatial_std():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, 4, 4, generator=g)
    std = x.reshape(5, 8, -1).std(dim=2)  # unbiased, per channel
    c = std - std.mean(1, keepdim=True)
    c = c / (1e-8 + c.norm(dim=1, keepdim=True))
    # the formula written out, other reductions: rounding of sums over 16 pixels, 8 channels
    assert_rounding_close(similarity_matrix(x), (c @ c.t()).clamp(-1, 1), terms=16, depth=3)
    # raw images (<= 3 channels) and --no-similarity-std are flattened instead
    flat = x.reshape(5, -1)
    f = flat - flat.mean(1, keepdim=True)
    f = f / (1e-8 + f.norm(dim=1, keepdim=True))
    assert_rounding_close(similarity_matrix(x, use_std=False), f @ f.t(), terms=128, depth=2)
    img = x[:, :3]
    assert similarity_matrix(img).shape == (5, 5)
    assert torch.allclose(similarity_matrix(img), similarity_matrix(img, use_std=False))


def test_similarity_is_clamped_and_has_unit_diagonal():
    x = torch.randn(7, 20)
    r = similarity_matrix(x)
    assert r.max() <= 1 and r.min() >= -1
    assert torch.allclose(r.diagonal(), torch.ones(7), atol=1e-5)


def test_feedback_alignment_uses_the_fixed_matrix():
    # the layer's matmuls against the same products written out (other kernels: addmm, mm of
    # a transpose): equal up to the rounding of sums of at most 6 terms
    fa = LinearFA(6, 4)
    with torch.no_grad():
        fa.weight.normal_()
        fa.bias.normal_()
        fa.feedback.normal_()
    x = torch.randn(3, 6, requires_grad=True)
    out = fa(x)
    assert_rounding_close(out, x @ fa.weight.t() + fa.bias, terms=7)
    g = torch.randn(3, 4)
    out.backward(g)
    assert_rounding_close(x.grad, g @ fa.feedback, terms=4)  # not g @ weight:
    assert (x.grad - g @ fa.weight).abs().max() > 0.1  # two independent normal matrices
    assert_rounding_close(fa.weight.grad, g.t() @ x.detach(), terms=3)
    assert_rounding_close(fa.bias.grad, g.sum(0), terms=3)
    assert "feedback" in dict(fa.named_buffers())  # fixed: never in an optimizer


def test_pred_bio_loss_targets_are_signs_of_the_projection():
    logits = torch.zeros(2, 3)
    proj = torch.tensor([[0.5, -0.2, 0.1], [-1.0, 2.0, -0.3]])
    # BCE with logits 0 is log(2) whatever the targets
    assert math.isclose(pred_bio_loss(logits, proj).item(), math.log(2), rel_tol=1e-6)
    big = torch.tensor([[9.0, -9.0, 9.0], [-9.0, 9.0, -9.0]])
    assert pred_bio_loss(big, proj).item() < 1e-3


def test_a_constant_row_gets_a_zero_gradient_not_nan():
    # a sample whose map is all zero (after ReLU, few channels) made every weight NaN
    x = torch.randn(4, 2, 3, 3)
    x[1] = 0
    x.requires_grad_(True)
    sim_loss(similarity_matrix(x), torch.eye(4)).backward()
    assert torch.isfinite(x.grad).all() and x.grad[1].abs().sum() == 0
    z = torch.randn(5, 7)  # other rows: the same bits as the plain formula
    zc = z - z.mean(dim=1, keepdim=True)
    plain = (zc / (1e-8 + torch.sqrt((zc ** 2).sum(dim=1, keepdim=True)))) @ \
        (zc / (1e-8 + torch.sqrt((zc ** 2).sum(dim=1, keepdim=True)))).t()
    assert torch.equal(similarity_matrix(z), plain.clamp(-1, 1))
