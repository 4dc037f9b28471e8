"""Local losses of Nøkland & Eidnes (2019): tensors in, scalar out (docs/algorithm.md,
section 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["similarity_matrix", "sim_loss", "pred_loss", "pred_bio_loss", "onehot",
           "LinearFAFunction", "LocalLoss", "UnsupervisedSim", "Reconstruction",
           "SupervisedSim", "Prediction"]


def similarity_matrix(x: torch.Tensor, use_std: bool = True) -> torch.Tensor:
    """B x B adjusted-cosine similarity of the rows of `x`, clamped to [-1, 1].

    A 4-D map (B, C, H, W) with C > 3 and H > 1 is reduced to its per-channel spatial standard
    deviation (unbiased) when `use_std`; otherwise every sample is flattened. Rows are centred,
    divided by (1e-8 + L2 norm), and multiplied with their transpose. A constant row gets a zero
    gradient (the reference's gives NaN).
    """
    if x.dim() == 4 and use_std and x.size(1) > 3 and x.size(2) > 1:
        z = x.reshape(x.size(0), x.size(1), -1).std(dim=2)
    else:
        z = x.reshape(x.size(0), -1)
    zc = z - z.mean(dim=1, keepdim=True)
    # clamp: a constant row (a sample whose map is all zero after ReLU) has norm 0, where the
    # gradient of sqrt is infinite and 0 * inf made every weight NaN; the clamp changes no value
    # (such a row is 0 either way) and leaves every other row's bits as they were
    zn = zc / (1e-8 + torch.sqrt((zc ** 2).sum(dim=1, keepdim=True).clamp_min(1e-30)))
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


# --- a block's local loss, composed once from the config ----------------------------------------
# Each term reads the block's own heads (decoder_y, proj_y, decoder_x, sim_input, pred_input)
# through the `block` argument; the composition replaces a switchboard of flags in the block.

class UnsupervisedSim:
    """Unsupervised similarity matching: the block's similarity against its input's."""

    def __init__(self, use_std: bool):
        self.use_std = use_std

    def __call__(self, block, x, h, rh):
        return sim_loss(rh, similarity_matrix(x.detach(), self.use_std))


class Reconstruction:
    """Reconstruction of the block's input through its transposed decoder."""

    def __call__(self, block, x, h, rh):
        return F.mse_loss(block.nonlin(block.decoder_x(h)), x.detach())


class SupervisedSim:
    """Similarity matching against the labels' similarity (their fixed random projection
    under bio)."""

    def __init__(self, use_std: bool, bio: bool):
        self.use_std, self.bio = use_std, bio

    def __call__(self, block, rh, y_onehot):
        target = y_onehot.matmul(block.proj_y.t()) if self.bio else y_onehot
        return sim_loss(rh, similarity_matrix(target, self.use_std))


class Prediction:
    """The local classifier's loss and its number of correct guesses: cross-entropy, or under
    bio BCE against the projected label's sign, decoded by the closest class code."""

    def __init__(self, bio: bool):
        self.bio = bio

    def __call__(self, block, h, y, y_onehot):
        logits = block.decoder_y(block.pred_input(h).flatten(1))
        if self.bio:
            loss = pred_bio_loss(logits, y_onehot.matmul(block.proj_y.t()))
            codes = (block.proj_y > 0).to(logits.dtype) * 2 - 1  # P x C class codes
            guess = logits.detach().matmul(codes).argmax(1)
        else:
            loss = pred_loss(logits, y)
            guess = logits.detach().argmax(1)
        return loss, (guess == y).sum().float()  # exact counts also under bf16


class LocalLoss:
    """alpha * unsupervised + (1 - alpha) * (pred + sim), with pred and sim weighted
    (1 - beta, beta) under predsim; absent terms are zero. Returns (loss, stats) with stats =
    (loss, sim, pred, correct) detached as float32 (blocks.STAT_FIELDS)."""

    def __init__(self, cfg, *, local: bool, use_pred: bool, use_sim: bool, use_recon: bool):
        self.alpha, self.use_std, self.use_sim = cfg.alpha, cfg.similarity_std, use_sim
        self.unsupervised = None
        if local and cfg.loss_unsup == "sim":
            self.unsupervised = UnsupervisedSim(cfg.similarity_std)
        elif use_recon:
            self.unsupervised = Reconstruction()
        self.sim = SupervisedSim(cfg.similarity_std, cfg.bio) \
            if local and cfg.loss_sup in ("sim", "predsim") else None
        self.pred = Prediction(cfg.bio) if use_pred else None
        self.weights = (1 - cfg.beta, cfg.beta) if cfg.loss_sup == "predsim" else None

    def __call__(self, block, x, h, y, y_onehot):
        zero = h.new_zeros(())
        rh = similarity_matrix(block.sim_input(h), self.use_std) if self.use_sim else None
        unsup = self.unsupervised(block, x, h, rh) if self.unsupervised else zero
        lsim = self.sim(block, rh, y_onehot) if self.sim else zero
        lpred, correct = self.pred(block, h, y, y_onehot) if self.pred else (zero, zero)
        if self.weights:
            lpred, lsim = self.weights[0] * lpred, self.weights[1] * lsim
        loss = self.alpha * unsup + (1 - self.alpha) * (lpred + lsim)
        return loss, torch.stack([t.detach().float() for t in (loss, lsim, lpred, correct)])
