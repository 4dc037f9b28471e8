"""The built-in objectives' heads, registered with the objective registry (models/objectives.py).

- pred, sim, predsim (Nøkland & Eidnes 2019): the paper's losses. Without --local-modules the
  blocks build them per layer (models/blocks.py, models/losses.py); with it, `PaperHead` puts
  the same heads at the end of each module (docs/algorithm.md 10.1).
- dgl (Belilovsky, Eickenberg, Oyallon 2020): `DGLHead`, cross-entropy of an auxiliary network
  that averages the map to a quarter of its size, applies 1x1 convolutions, averages to 2x2
  and ends in an MLP (docs/algorithm.md 10.2, with its source and the differences).

A head sees the module's output as a map: a conv map (C, H, W) as it is, tokens (N, D) of a
square patch grid as their layer-normalised (D, g, g) map; a vector (F,) stays a vector.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from localloss_pp.models.blocks import LinearFA, decoder_pool
from localloss_pp.models.losses import LocalLoss
from localloss_pp.models.objectives import Head, ModuleSpec, register_objective

__all__ = ["PaperHead", "DGLHead", "FeatureView"]


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


for _name in ("pred", "sim", "predsim"):
    register_objective(_name, PaperHead, terms=PaperHead.terms, layerwise=True,
                       description="the paper's local losses")
register_objective("dgl", DGLHead, terms=DGLHead.terms,
                   description="DGL: cross-entropy of an MLP-SR auxiliary network")
