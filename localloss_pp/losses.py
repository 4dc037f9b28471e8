"""Local losses of Nøkland & Eidnes (2019): tensors in, scalar out (SPEC.md section 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["similarity_matrix", "sim_loss", "pred_loss", "pred_bio_loss", "onehot",
           "LinearFAFunction"]


def similarity_matrix(x: torch.Tensor, use_std: bool = True) -> torch.Tensor:
    """B x B adjusted-cosine similarity of the rows of `x`, clamped to [-1, 1].

    A 4-D map (B, C, H, W) with C > 3 and H > 1 is reduced to its per-channel spatial standard
    deviation (unbiased) when `use_std`; otherwise every sample is flattened. Rows are centred,
    divided by (1e-8 + L2 norm), and multiplied with their transpose.
    """
    if x.dim() == 4 and use_std and x.size(1) > 3 and x.size(2) > 1:
        z = x.reshape(x.size(0), x.size(1), -1).std(dim=2)
    else:
        z = x.reshape(x.size(0), -1)
    zc = z - z.mean(dim=1, keepdim=True)
    zn = zc / (1e-8 + torch.sqrt((zc ** 2).sum(dim=1, keepdim=True)))
    return zn.matmul(zn.t()).clamp(-1, 1)


def sim_loss(rh: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of two similarity matrices; the target gets no gradient."""
    return F.mse_loss(rh, target.detach())


def pred_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a local (or the output) classifier, averaged over the batch."""
    return F.cross_entropy(logits, y)


def pred_bio_loss(logits: torch.Tensor, projected_target: torch.Tensor) -> torch.Tensor:
    """pred-bio: BCE-with-logits against the sign of the fixed random label projection."""
    return F.binary_cross_entropy_with_logits(logits, (projected_target > 0).to(logits.dtype))


def onehot(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float one-hot matrix (B x num_classes) on the device of `y` (a scatter: unlike
    F.one_hot it never checks the label range on the host, so no device synchronisation)."""
    out = torch.zeros(y.size(0), num_classes, dtype=dtype, device=y.device)
    return out.scatter_(1, y.view(-1, 1), 1.0)


class LinearFAFunction(torch.autograd.Function):
    """Affine map whose input gradient goes through a fixed random matrix (feedback alignment)."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        # in the weights' precision (fp32) also under autocast: the backward, which runs
        # outside autocast, multiplies the saved input with fp32 gradients
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(weight.dtype)
            ctx.save_for_backward(x, weight, feedback)
            out = x.matmul(weight.t())
            if bias is not None:
                out = out + bias
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, feedback = ctx.saved_tensors
        grad_out = grad_out.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(feedback)
        if ctx.needs_input_grad[1]:
            grad_w = grad_out.t().matmul(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None
