"""Bring your own local objective: a "linear probe" head defined outside the localloss_pp package.

Each local module is trained by the cross-entropy of one linear layer on its globally averaged
features, plus a small penalty on the features' magnitude (two named terms, reported by name in
metrics.jsonl, the log lines and TensorBoard). The trainer imports this module when it is named
with `--objective-module`, on every process of the run:

    torchrun --standalone --nproc-per-node 2 -m localloss_pp train --dataset mnist5k \\
        --model resnet20 --feat-mult 0.25 --objective-module examples.custom_objective \\
        --loss-sup linear-probe --local-modules 4 --epochs 3

(run from the repository root, or put the module anywhere on PYTHONPATH).
"""
import torch.nn as nn
import torch.nn.functional as F

from localloss_pp.models import Head, register_objective


@register_objective("linear-probe", terms=("loss_pred", "loss_size"),
                    description="cross-entropy of a linear layer on averaged features")
class LinearProbe(Head):
    """Built once per local module from its ModuleSpec (on the meta device, like every unit)."""

    terms = ("loss_pred", "loss_size")
    size_weight = 1e-3

    def __init__(self, spec):
        super().__init__()
        features = spec.out_shape[0] if len(spec.out_shape) == 3 else spec.out_shape[-1]
        self.classifier = nn.Linear(features, spec.num_classes)

    def loss(self, h, y, y_onehot, *, x, image):
        # a map (B, C, H, W) is averaged over space, tokens (B, N, D) over the tokens
        z = h.mean(dim=(2, 3)) if h.dim() == 4 else (h.mean(dim=1) if h.dim() == 3 else h)
        logits = self.classifier(z)
        pred = F.cross_entropy(logits, y)
        size = z.pow(2).mean()
        loss = pred + self.size_weight * size
        correct = (logits.detach().argmax(1) == y).sum()
        # stats: the total, each term in the order of `terms`, then the correct guesses
        return loss, self.stats(loss, [pred, size], correct)

    def describe(self):
        return f"linear probe ({self.classifier.in_features}->{self.classifier.out_features})"

