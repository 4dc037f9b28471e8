"""The built-in objectives' heads, registered with the objective registry (models/objectives.py).

- pred, sim, predsim (Nøkland & Eidnes 2019): the paper's losses. Without --local-modules the
  blocks build them per layer (models/blocks.py, models/losses.py); with it, `PaperHead` puts
  the same heads at the end of each module (docs/algorithm.md 10.1).
- dgl (Belilovsky, Eickenberg, Oyallon 2020): `DGLHead`, cross-entropy of an auxiliary network
  that averages the map to a quarter of its size, applies 1x1 convolutions, averages to 2x2
  and ends in an MLP (docs/algorithm.md 10.2, with its source and the differences).
- infopro, infopro-ce (Wang et al. 2021): `InfoProHead`, a decoder that reconstructs the
  network's input image from the module's map plus a small classifier (supervised contrastive
  as published, or cross-entropy as AugLocal's comparison runs it), weighted per module as the
  published commands weight them (docs/algorithm.md 10.3).

A head sees the module's output as a map: a conv map (C, H, W) as it is, tokens (N, D) of a
square patch grid as their layer-normalised (D, g, g) map; a vector (F,) stays a vector.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from localloss_pp.models.blocks import LinearFA, decoder_pool
from localloss_pp.models.losses import LocalLoss
from localloss_pp.models.objectives import Head, ModuleSpec, register_objective

__all__ = ["PaperHead", "DGLHead", "InfoProHead", "FeatureView", "supervised_contrastive",
           "INFOPRO_WEIGHTS", "infopro_weights"]


class FeatureView(nn.Module):
    """The module output as a head reads it: conv maps as they are, tokens (N, D) on a square
    grid as a layer-normalised (D, g, g) map, vectors flattened. `shape` is what it gives per
    example."""

    def __init__(self, out_shape: tuple):
        super().__init__()
        self.tokens = None
        if len(out_shape) == 2:  # (tokens, dim) of a ViT unit
            n, d = out_shape
            g = math.isqrt(n)
            if g * g != n:
                raise ValueError(f"a head reads tokens on a square grid; {n} tokens are not one")
            self.tokens = g
            with torch.device("meta"):
                self.norm = nn.LayerNorm(d)
            self.shape = (d, g, g)
        elif len(out_shape) == 3:
            self.shape = tuple(out_shape)
        else:
            self.shape = (math.prod(out_shape),)

    def forward(self, h):
        if self.tokens is not None:
            t = self.norm(h)
            return t.transpose(1, 2).reshape(t.size(0), t.size(2), self.tokens, self.tokens)
        return h if len(self.shape) == 3 else h.flatten(1)


class PaperHead(Head):
    """The paper's pred / sim / predsim heads at the end of a module: a linear classifier on
    the average-pooled map (at most --dim-in-decoder values; a fixed random target projection
    under --bio), a similarity head (3x3 conv on maps, linear on vectors), the losses and their
    weighting of models/losses.py. --loss-unsup sim compares with the module's input; recon
    needs a decoder per layer and is per-layer only."""

    terms = ("loss_sim", "loss_pred")

    def __init__(self, spec: ModuleSpec):
        super().__init__()
        cfg = self.cfg = spec.loss
        if cfg.loss_unsup == "recon":
            raise ValueError("--loss-unsup recon decodes each layer's input and is not available "
                             "with --local-modules; use --loss-unsup sim or none")
        self.num_classes = spec.num_classes
        self.view = FeatureView(spec.out_shape)
        shape = self.view.shape
        self.use_pred = cfg.loss_sup in ("pred", "predsim")
        self.use_sim = cfg.loss_sup in ("sim", "predsim") or cfg.loss_unsup == "sim"
        self.reports_error = self.use_pred
        with torch.device("meta"):
            self.avg_pool, dec_in = None, shape[0]
            if len(shape) == 3:
                self.avg_pool, _, _, dec_in = decoder_pool(shape[0], shape[1],
                                                           spec.model.dim_in_decoder)
            if self.use_pred:
                self.decoder_y = (LinearFA(dec_in, cfg.target_proj_size) if cfg.bio
                                  else nn.Linear(dec_in, spec.num_classes))
            if cfg.bio:
                self.register_buffer("proj_y", torch.empty(cfg.target_proj_size,
                                                           spec.num_classes))
            if self.use_sim and not cfg.bio:
                self.sim_head = (nn.Conv2d(shape[0], shape[0], 3, 1, 1, bias=False)
                                 if len(shape) == 3 else nn.Linear(shape[0], shape[0],
                                                                    bias=False))
        self.loss_fn = LocalLoss(cfg, local=True, use_pred=self.use_pred, use_sim=self.use_sim,
                                 use_recon=False)

    def init_weights(self, gen):
        super().init_weights(gen)
        with torch.no_grad():
            if self.use_pred and isinstance(self.decoder_y, nn.Linear):
                self.decoder_y.weight.zero_()  # as the blocks' decoders (reference)
            if isinstance(getattr(self, "decoder_y", None), LinearFA):
                fa = self.decoder_y
                fa.weight.zero_()
                fa.bias.zero_()
                fa.feedback.uniform_(-1 / math.sqrt(fa.in_features),
                                     1 / math.sqrt(fa.in_features), generator=gen)
            if self.cfg.bio:
                bound = 1.0 / math.sqrt(self.num_classes)
                self.proj_y.uniform_(-bound, bound, generator=gen)

    # what models/losses.py reads on a "block"
    def pred_input(self, h):
        return self.avg_pool(h) if self.avg_pool is not None else h

    def sim_input(self, h):
        return self.pred_input(h) if self.cfg.bio else self.sim_head(h)

    def loss(self, h, y, y_onehot, *, x, image):
        return self.loss_fn(self, x, self.view(h), y, y_onehot)

    def describe(self) -> str:
        parts = (["pred"] if self.use_pred else []) + (["sim"] if self.use_sim else [])
        return "+".join(parts) + " head"


class DGLHead(Head):
    """DGL's auxiliary network ("MLP-SR"): on a (C, H, W) map, average pooling to
    ceil(H/4) x ceil(W/4), `num_convs` x [1x1 conv (no bias) -> BatchNorm -> ReLU], average
    pooling to 2x2, then `num_mlp` x [Linear(4C, 4C) -> BatchNorm1d -> ReLU] and a linear layer
    to the classes; cross-entropy. A vector (F,) goes straight to the MLP (width F)."""

    terms = ("loss_pred",)
    num_convs, num_mlp = 3, 3

    def __init__(self, spec: ModuleSpec):
        super().__init__()
        self.view = FeatureView(spec.out_shape)
        shape = self.view.shape
        with torch.device("meta"):
            convs = []
            if len(shape) == 3:
                c, hgt, wid = shape
                self.reduced = (math.ceil(hgt / 4), math.ceil(wid / 4))
                for _ in range(self.num_convs):
                    convs += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
                width = c * min(2, self.reduced[0]) * min(2, self.reduced[1])
            else:
                self.reduced, width = None, shape[0]
            self.convs = nn.Sequential(*convs)
            mlp = []
            for _ in range(self.num_mlp):
                mlp += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
            self.mlp = nn.Sequential(*mlp, nn.Linear(width, spec.num_classes))

    def loss(self, h, y, y_onehot, *, x, image):
        h = self.view(h)
        if self.reduced is not None:
            h = self.convs(F.adaptive_avg_pool2d(h, self.reduced))
            h = F.adaptive_avg_pool2d(h, (min(2, self.reduced[0]), min(2, self.reduced[1])))
        logits = self.mlp(h.flatten(1))
        loss = F.cross_entropy(logits, y)
        correct = (logits.detach().argmax(1) == y).sum()
        return loss, self.stats(loss, [loss], correct)

    def describe(self) -> str:
        return f"DGL head ({self.num_convs} 1x1 convs, {self.num_mlp}-layer MLP)"


# (lambda_recon, lambda_task) of the first and of the last module with a head, per K: the
# published ResNet-32 commands (InfoPro-Pytorch, comand.sh: ixx_1, ixy_1, ixx_2, ixy_2)
INFOPRO_WEIGHTS = {2: (5.0, 1.0, 0.0, 0.0), 4: (6.0, 0.0, 1.0, 2.0), 8: (5.0, 0.0, 0.0, 2.0),
                   16: (5.0, 0.05, 0.2, 0.5)}


def infopro_weights(index: int, num_modules: int) -> tuple[float, float]:
    """(reconstruction weight, task weight) of module `index` of `num_modules` (the last one,
    trained by the network's classifier, has none): linear from the first module's pair to the
    pair of module K-2, from the published commands of the nearest K (ties: the larger K)."""
    k = min(INFOPRO_WEIGHTS, key=lambda n: (abs(n - num_modules), -n))
    ixx_1, ixy_1, ixx_2, ixy_2 = INFOPRO_WEIGHTS[k]
    ratio = index / (num_modules - 2) if num_modules > 2 else 0.0
    return ixx_1 * (1 - ratio) + ixx_2 * ratio, ixy_1 * (1 - ratio) + ixy_2 * ratio


def supervised_contrastive(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.07):
    """The supervised contrastive loss of one view (Khosla et al. 2020) on L2-normalised rows
    `z`: for every anchor, the mean log-probability of the other examples of its class among
    all other examples, at `temperature`; an anchor without such an example adds 0."""
    sim = z.matmul(z.t()) / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    others = ~torch.eye(z.size(0), dtype=torch.bool, device=z.device)
    log_prob = sim - torch.log((sim.exp() * others).sum(dim=1, keepdim=True))
    positive = (y.view(-1, 1) == y.view(1, -1)) & others
    mean_positive = (log_prob * positive).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    return -mean_positive.mean()


def _no_autocast(device_type: str):
    """Autocast off on devices that have it (the meta device of a shape pass has none)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class InfoProHead(Head):
    """InfoPro's heads on a (C, H, W) map: a decoder (bilinear upsampling to the input's size,
    3x3 conv to 12 channels, BatchNorm, ReLU, 3x3 conv to the input's channels) whose sigmoid
    reconstructs the un-normalised input image in [0, 1] under binary cross-entropy; and an
    auxiliary classifier ("1c2f": a 3x3 conv, stride 2 with twice the channels while the map
    is larger than a quarter of the input, else stride 1 with the same, BatchNorm, ReLU, global
    average pooling, Linear to 128, ReLU, Linear to 128 features under the supervised
    contrastive loss at temperature 0.07, or to the classes under cross-entropy). loss =
    lambda_recon * reconstruction + lambda_task * task (`infopro_weights`)."""

    needs_input = True
    hidden = 128

    def __init__(self, spec: ModuleSpec, contrast: bool = True):
        super().__init__()
        self.view = FeatureView(spec.out_shape)
        if len(self.view.shape) != 3:
            raise ValueError(f"{spec.loss.loss_sup} reconstructs the input image from a module's "
                             f"feature map; this model's units give vectors of "
                             f"{self.view.shape[0]} values: use a conv model, or --loss-sup dgl")
        c, hgt, _ = self.view.shape
        in_c, in_h, in_w = spec.input_shape
        self.contrast, self.size = contrast, (in_h, in_w)
        self.terms = ("loss_contrast" if contrast else "loss_pred", "loss_recon")
        self.reports_error = not contrast
        self.weights = infopro_weights(spec.index, spec.num_modules)
        down = hgt > in_h // 4
        width = 2 * c if down else c
        self.input_norm = (tuple(spec.input_mean) or (0.0,) * in_c,
                           tuple(spec.input_std) or (1.0,) * in_c)
        with torch.device("meta"):
            self.decoder = nn.Sequential(
                nn.Conv2d(c, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                nn.Conv2d(12, in_c, 3, padding=1))
            self.aux = nn.Sequential(
                nn.Conv2d(c, width, 3, stride=2 if down else 1, padding=1, bias=False),
                nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(width, self.hidden), nn.ReLU(),
                nn.Linear(self.hidden, self.hidden if contrast else spec.num_classes))
            # the dataset's normalisation, to recover the image in [0, 1]: not part of the
            # weights (non-persistent), set in init_weights
            self.register_buffer("mean", torch.empty(1, in_c, 1, 1), persistent=False)
            self.register_buffer("std", torch.empty(1, in_c, 1, 1), persistent=False)

    def init_weights(self, gen):
        super().init_weights(gen)
        with torch.no_grad():
            self.mean.copy_(torch.tensor(self.input_norm[0]).view(1, -1, 1, 1))
            self.std.copy_(torch.tensor(self.input_norm[1]).view(1, -1, 1, 1))

    def loss(self, h, y, y_onehot, *, x, image):
        h = self.view(h)
        up = F.interpolate(h, size=self.size, mode="bilinear", align_corners=True)
        target = (image.float() * self.std + self.mean).clamp(0, 1)
        recon = F.binary_cross_entropy_with_logits(self.decoder(up).float(), target)
        z = self.aux(h)
        if self.contrast:  # in fp32 also under bf16 autocast: similarities / 0.07
            with _no_autocast(z.device.type):
                task = supervised_contrastive(F.normalize(z.float(), dim=1), y)
            correct = task.new_zeros(())
        else:
            task = F.cross_entropy(z, y)
            correct = (z.detach().argmax(1) == y).sum()
        loss = self.weights[0] * recon + self.weights[1] * task
        return loss, self.stats(loss, [task, recon], correct)

    def describe(self) -> str:
        kind = "contrastive" if self.contrast else "cross-entropy"
        return (f"InfoPro decoder + {kind} head (weights {self.weights[0]:.3g} recon, "
                f"{self.weights[1]:.3g} task)")


for _name in ("pred", "sim", "predsim"):
    register_objective(_name, PaperHead, terms=PaperHead.terms, layerwise=True,
                       description="the paper's local losses")
register_objective("dgl", DGLHead, terms=DGLHead.terms,
                   description="DGL: cross-entropy of an MLP-SR auxiliary network")
register_objective("infopro", InfoProHead, terms=("loss_contrast", "loss_recon"),
                   needs_input=True, description="InfoPro: reconstruction of the input image "
                   "and a supervised contrastive head")
register_objective("infopro-ce", lambda spec: InfoProHead(spec, contrast=False),
                   terms=("loss_pred", "loss_recon"), needs_input=True,
                   description="InfoPro with a cross-entropy head (as AugLocal compares it)")
