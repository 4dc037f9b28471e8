"""Vision Transformers trained with local losses, as pipeline units (docs/algorithm.md,
"Vision Transformers").

A ViT here is a patch-embedding unit, then one unit per transformer block, then the output
layer; every unit has its own local loss, exactly like the blocks of the VGGs:

- **Patch embedding** (unit 0): a convolution with kernel = stride = patch size turns the image
  into tokens, plus a learned position embedding. No class token (see below).
- **Transformer block** (units 1..depth): pre-norm, as in the ViT paper: x + Attention(LN(x)),
  then x + MLP(LN(x)) with GELU; multi-head self-attention through
  `torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPUs).
- **Output layer**: LayerNorm, then the tokens' grid read like the local heads read it (below),
  then a linear classifier.

Local losses on tokens: a block's heads read its output tokens through a LayerNorm of their own,
laid out as the grid of their patches (B, dim, g, g) and average-pooled to at most
`--dim-in-decoder` values, exactly as the conv blocks' decoders read their maps. `pred` is a
linear classifier on those values (the block's decoder); `sim` is the similarity matching loss
on a per-token linear projection (dim -> dim, no bias) of the normalised tokens, whose
similarity matrix takes each channel's standard deviation over the grid, as a conv block's
similarity does over its map; `predsim` mixes them as for every other model.

Why the grid and not the mean token (or a class token), measured: with heads and output layer
on the mean of the tokens, one epoch of vit-nano on MNIST (local pred, lr 3e-3) ended at 41.8%
test error, against 4.3% with the grid (and 3.5% for backprop). A local loss on the mean can
only use what survives averaging over positions, so the early blocks, which cannot yet route
information between tokens, learn almost nothing useful; the grid keeps where each patch is.
A class token would be worse still: it is read only at the end, so no block's loss but the
last would train it.

Names: vit-<depth>-<dim>[-p<patch>][-h<heads>][-m<mlp ratio>], defaults patch 4, heads dim/64
(at least 1), MLP ratio 4; and the presets of `VIT_PRESETS`.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from localloss_pp.models.blocks import LocalBlock, OutputLayer, decoder_pool, output_loss_scale
from localloss_pp.seeds import derive_seed

__all__ = ["VIT_PRESETS", "ViTSpec", "parse_vit", "is_vit", "build_vit", "PatchEmbedUnit",
           "TransformerUnit", "TokenOutputLayer", "VIT_PATTERN"]

VIT_PATTERN = r"vit-(\d+)-(\d+)(?:-p(\d+))?(?:-h(\d+))?(?:-m(\d+))?"
_VIT = re.compile(VIT_PATTERN)

# name -> the full name it stands for
VIT_PRESETS = {
    "vit-nano": "vit-4-32-p7-h1",     # 16 tokens on 28x28: seconds per MNIST epoch on a CPU
    "vit-micro": "vit-6-64-p4-h2",    # 49 tokens on 28x28 (64 on 32x32): a CPU's small ViT
    "vit-tiny": "vit-12-192-p4-h3",   # ViT-Ti's width and depth at patch 4: a GPU's choice
}


class ViTSpec:
    """depth, dim, patch, heads, mlp_ratio of a ViT name."""

    def __init__(self, depth: int, dim: int, patch: int, heads: int, mlp_ratio: int):
        self.depth, self.dim, self.patch = depth, dim, patch
        self.heads, self.mlp_ratio = heads, mlp_ratio

    def __repr__(self) -> str:
        return (f"vit-{self.depth}-{self.dim}-p{self.patch}-h{self.heads}-m{self.mlp_ratio}")


def is_vit(name: str) -> bool:
    return name.lower().startswith("vit")


def parse_vit(name: str) -> ViTSpec:
    """The ViTSpec of a name; a ValueError that says how ViTs are named."""
    full = VIT_PRESETS.get(name.lower(), name.lower())
    m = _VIT.fullmatch(full)
    if not m:
        raise ValueError(f"model {name!r}: a ViT is named vit-<depth>-<dim>[-p<patch>]"
                         "[-h<heads>][-m<mlp ratio>] (e.g. vit-6-64-p4) or is one of "
                         f"{', '.join(VIT_PRESETS)}")
    depth, dim = int(m.group(1)), int(m.group(2))
    patch = int(m.group(3) or 4)
    heads = int(m.group(4) or max(1, dim // 64))
    mlp_ratio = int(m.group(5) or 4)
    if depth < 1 or dim < 1 or patch < 1 or heads < 1 or mlp_ratio < 1:
        raise ValueError(f"model {name!r}: depth, dim, patch, heads and MLP ratio must be >= 1")
    if dim % heads:
        raise ValueError(f"model {name!r}: dim {dim} is not divisible by {heads} heads; choose "
                         "-h<heads> dividing the dim")
    return ViTSpec(depth, dim, patch, heads, mlp_ratio)


def _grid(t: torch.Tensor, grid: int) -> torch.Tensor:
    """Tokens (B, N, dim) as the map (B, dim, g, g) of their patches' grid (N = g x g)."""
    return t.transpose(1, 2).reshape(t.size(0), t.size(2), grid, grid)


class _TokenHeads(LocalBlock):
    """The local heads of a unit whose output is tokens (B, N, dim): the normalised tokens on
    their patches' grid, average-pooled to at most dim_in_decoder values, feed the pred decoder;
    a per-token linear projection of them feeds the similarity matching loss (module
    docstring)."""

    def __init__(self, dim: int, *, loss, grid: int, dim_in_decoder: int, **kw):
        if loss.loss_unsup == "recon":
            raise ValueError("--loss-unsup recon is not available for ViT models (a block's "
                             "input is not an image it could decode back to); use --loss-unsup "
                             "sim or none")
        super().__init__(loss=loss, nonlin="relu", **kw)
        self.dim, self.grid = dim, grid
        pool, _, _, dec_in = decoder_pool(dim, grid, dim_in_decoder)
        with torch.device("meta"):
            self.head_norm = nn.LayerNorm(dim) if self.local else None
            self.avg_pool = pool
            self._build_common_heads(dim, dec_in)
            if self.use_sim and not self.cfg.bio:
                self.linear_loss = nn.Linear(dim, dim, bias=False)

    def materialize(self) -> None:
        super().materialize()  # Linear/Conv init from the unit's seed, decoder zeroed
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.LayerNorm):
                    module.reset_parameters()

    def _map(self, t):
        return _grid(t, self.grid)

    def pred_input(self, h):
        m = self._map(self.head_norm(h))
        return self.avg_pool(m) if self.avg_pool is not None else m

    def sim_input(self, h):
        t = self.head_norm(h)
        return self.pred_input(h) if self.cfg.bio else self._map(self.linear_loss(t))


class PatchEmbedUnit(_TokenHeads):
    """Unit 0: patches -> tokens (a conv with kernel = stride = patch) + position embedding."""

    def __init__(self, channels: int, size: int, spec: ViTSpec, **kw):
        super().__init__(spec.dim, first_layer=True, **kw)
        self.patch, self.tokens = spec.patch, (size // spec.patch) ** 2
        with torch.device("meta"):
            self.encoder = nn.Conv2d(channels, spec.dim, spec.patch, spec.patch)
            self.pos = nn.Parameter(torch.empty(1, self.tokens, spec.dim))

    def materialize(self) -> None:
        super().materialize()
        gen = torch.Generator().manual_seed(derive_seed(self._seed, self.index, "init/pos"))
        with torch.no_grad():
            self.pos.normal_(0.0, 0.02, generator=gen)

    def describe(self) -> str:
        return (f"PatchEmbed({self.encoder.in_channels}x{self.patch}x{self.patch}->{self.dim})"
                f"x{self.tokens}")

    def encode(self, x):
        return self.encoder(x).flatten(2).transpose(1, 2).contiguous() + self.pos


class TransformerUnit(_TokenHeads):
    """A pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, spec: ViTSpec, **kw):
        super().__init__(spec.dim, first_layer=False, **kw)
        dim, self.heads = spec.dim, spec.heads
        hidden = dim * spec.mlp_ratio
        with torch.device("meta"):
            self.norm1 = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, hidden)
            self.fc2 = nn.Linear(hidden, dim)

    def describe(self) -> str:
        return f"Transformer({self.dim}, {self.heads} heads, mlp {self.fc1.out_features})"

    def encode(self, x):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head dim)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TokenOutputLayer(OutputLayer):
    """LayerNorm -> the tokens' grid average-pooled to at most dim_in_decoder values (as the
    local heads read it) -> linear classifier."""

    def __init__(self, dim: int, grid: int, dim_in_decoder: int, num_classes: int, **kw):
        pool, _, _, dec_in = decoder_pool(dim, grid, dim_in_decoder)
        super().__init__(dec_in, num_classes, **kw)
        self.dim, self.grid = dim, grid
        with torch.device("meta"):
            self.norm = nn.LayerNorm(dim)
            self.avg_pool = pool

    def materialize(self) -> None:
        super().materialize()
        with torch.no_grad():
            self.norm.reset_parameters()

    def describe(self) -> str:
        pool = "" if self.avg_pool is None else "-pool"
        return (f"LayerNorm{pool}-Linear({self.linear.in_features}->"
                f"{self.linear.out_features})")

    def forward(self, x):
        m = _grid(self.norm(x), self.grid)
        if self.avg_pool is not None:
            m = self.avg_pool(m)
        return self.linear(m.flatten(1))


def build_vit(model, loss, input_shape, num_classes: int, seed: int):
    """(units, output layer) of a ViT name (module docstring)."""
    spec = parse_vit(model.name)
    channels, size, width = input_shape
    if size != width or size % spec.patch:
        raise ValueError(f"{model.name}: patch {spec.patch} does not tile the {size}x{width} "
                         f"input; choose -p<patch> dividing {size} (e.g. 4 or 7 for 28x28, 4 or "
                         "8 for 32x32)")
    common = dict(seed=seed, num_classes=num_classes, loss=loss, dropout=model.dropout,
                  grid=size // spec.patch, dim_in_decoder=model.dim_in_decoder)
    units = [PatchEmbedUnit(channels, size, spec, index=0, **common)]
    for i in range(spec.depth):
        units.append(TransformerUnit(spec, index=i + 1, **common))
    output = TokenOutputLayer(spec.dim, size // spec.patch, model.dim_in_decoder, num_classes,
                              index=len(units), seed=seed,
                              zero_init=not loss.backprop, loss_scale=output_loss_scale(loss))
    return units, output
