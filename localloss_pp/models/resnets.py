"""ResNets and Wide-ResNets trained with local losses (docs/algorithm.md 5.5), as pipeline units.

Every conv inside a residual block is a locally trained conv with its own local loss (decoder,
similarity head); the last conv of a block adds the shortcut (after its BatchNorm in a
post-activation ResNet); a projection shortcut is trained by the gradient of the last conv's
local loss. The **pipeline unit is a whole residual block** (`ConvUnit`): its convs, their
heads and its shortcut travel together, since the shortcut needs the block's input. A unit has
one optimizer over all its parameters: Adam/SGD act per parameter, and no gradient crosses from
one conv's loss into another conv (their inputs are detached), so this is the same update as
one optimizer per conv and one for the shortcut, as the reference has.

Fixed, not reproduced (docs/algorithm.md section 9):
- each conv's decoder pool is sized for its real output resolution (the reference's
  cumulative-stride bookkeeping gives BasicBlock's first strided conv the input resolution, so
  pred/predsim on resnet18/34 crash there), also for the Wide-ResNet stem (hard-coded 32 there);
- the Wide-ResNet head BatchNorm belongs to the output unit and is trained with it (the
  reference leaves it without an optimizer in local mode);
- the final pooling averages the whole last map (the reference's fixed avg-pool 4 / 8 equal
  that on 32x32 inputs; on other sizes the reference's linear layer does not fit).
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from localloss_pp.models.blocks import (LocalConvBlock, OutputLayer, Unit, _default_init,
                                        output_loss_scale)
from localloss_pp.seeds import derive_seed

__all__ = ["ResConv", "ConvUnit", "NormOutputLayer", "RESNET_DEPTHS", "build_resnet",
           "build_cifar_resnet", "build_wresnet", "is_resnet", "is_wresnet", "parse_wresnet",
           "parse_cifar_resnet", "CIFAR_RESNET_PATTERN"]

# depth -> (block kind, blocks per stage)
RESNET_DEPTHS = {18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                 50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)),
                 152: ("bottleneck", (3, 8, 36, 3))}
_WRN = re.compile(r"wresnet(\d+)-(\d+)(a?)")
# the CIFAR ResNets of He et al. 2016, section 4.2: resnet<6n+2> (resnet20, 32, 44, 56, 110, ...);
# resnet50 and resnet152 (also 6n+2) stay the reference's bottleneck networks above
CIFAR_RESNET_PATTERN = r"resnet\d+"


def is_resnet(name: str) -> bool:
    return name.startswith("resnet")


def is_wresnet(name: str) -> bool:
    return name.startswith("wresnet")


def parse_wresnet(name: str) -> tuple[int, int, bool]:
    """(depth, widen factor, adapted) of a name like wresnet16-4 or wresnet28-10a."""
    m = _WRN.fullmatch(name)
    if not m:
        raise ValueError(f"model {name!r}: a Wide-ResNet is named wresnet<depth>-<width>[a], "
                         "e.g. wresnet16-4 or wresnet28-10a")
    depth, width = int(m.group(1)), int(m.group(2))
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"model {name!r}: the depth of a Wide-ResNet is 6n+4 with n >= 1 "
                         "(10, 16, 22, 28, 40, ...) and its width >= 1")
    return depth, width, m.group(3) == "a"


def parse_cifar_resnet(name: str) -> int:
    """n, the basic blocks per group, of a CIFAR ResNet named resnet<6n+2> (resnet32: 5)."""
    m = re.fullmatch(r"resnet(\d+)", name)
    depth = int(m.group(1)) if m else 0
    if depth in RESNET_DEPTHS:
        raise ValueError(f"model {name!r} is the reference's ImageNet-style ResNet, not a CIFAR "
                         "ResNet")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model {name!r}: a ResNet is resnet18/34/50/101/152 (the reference's) "
                         "or a CIFAR ResNet resnet<6n+2> with n >= 1 (resnet8, 14, 20, 26, 32, "
                         "44, 56, 110, ...)")
    return (depth - 2) // 6


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class ResConv(LocalConvBlock):
    """One conv of a residual unit: LocalConvBlock with the reference's `bias`, `pre_act`
    (BN -> nonlin -> Dropout2d on the input, before the conv) and `post_act` (BN -> [+ shortcut]
    -> nonlin -> Dropout2d on the output; without it the output is the raw conv [+ shortcut],
    and BN and nonlin are applied for the local loss only)."""

    def __init__(self, ch_in: int, ch_out: int, *, pre_act: bool, post_act: bool,
                 position: int, batch_norm: bool = True, **kw):
        super().__init__(ch_in, ch_out, batch_norm=batch_norm, **kw)
        self.pre_act, self.post_act = pre_act, post_act
        self.init_purpose = f"init/conv{position}"
        with torch.device("meta"):
            if pre_act and not self.local:  # (the reference's rule: no BN after a pre-act conv)
                self.bn = None
            self.bn_pre = nn.BatchNorm2d(ch_in) if pre_act and batch_norm else None

    def run(self, x, shortcut=None):
        """(output for what follows, input of the local loss)."""
        if self.pre_act:
            if self.bn_pre is not None:
                x = self.bn_pre(x)
            x = self._dropout(self.nonlin(x))
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.encoder(x)
        if self.post_act:
            if self.bn is not None:
                h = self.bn(h)
            if shortcut is not None:
                h = h + shortcut
            h = self.nonlin(h)
            return self._dropout(h), h
        if shortcut is not None:
            h = h + shortcut
        if not self.local:
            return h, h
        return h, self.nonlin(self.bn(h) if self.bn is not None else h)


class ConvUnit(Unit):
    """A pipeline unit of convs: the stem (one conv) or a residual block (2 or 3 convs and an
    identity or projection shortcut). The unit protocol comes from blocks.Unit; the convs share
    the unit's dropout generator, autocast settings and optimizer."""

    channels_last_capable = True

    def __init__(self, convs: list[ResConv], *, index: int, seed: int, kind: str,
                 residual: bool, shortcut: nn.Module | None = None, mid_dropout: float = 0.0):
        super().__init__(index=index, seed=seed)
        self.kind, self.residual = kind, residual
        self.convs = nn.ModuleList(convs)
        self.shortcut = shortcut
        self.mid_dropout = mid_dropout  # element-wise, between the convs (plain Wide-ResNets)
        self.local = convs[0].local

    @property
    def decoder_y(self):
        """The last conv's local classifier: what the unit's decoder error is measured with."""
        return self.convs[-1].decoder_y

    # --- construction -------------------------------------------------------------------------
    def materialize(self) -> None:
        for conv in self.convs:
            conv.materialize()
        if self.shortcut is not None:
            self.shortcut.to_empty(device="cpu")
            gen = torch.Generator().manual_seed(derive_seed(self._seed, self.index,
                                                            "init/shortcut"))
            with torch.no_grad():
                for module in self.shortcut.modules():
                    if isinstance(module, nn.Conv2d):
                        _default_init(module, gen)
                    elif isinstance(module, nn.BatchNorm2d):
                        module.reset_parameters()

    def setup(self, device: torch.device, optim, **options) -> None:
        """Unit.setup, then the convs share the unit's dropout generator, autocast settings and
        memory format. (`compile` is not applied to residual units: they run eagerly.)"""
        super().setup(device, optim, **options)
        for conv in self.convs:
            conv.dropout_generator, conv._amp = self.dropout_generator, self._amp
            conv.act_dtype, conv._channels_last = self.act_dtype, self._channels_last

    def describe(self) -> str:
        first, last = self.convs[0], self.convs[-1]
        stride = max(c.encoder.stride[0] for c in self.convs)
        text = f"{self.kind}({first.ch_in}->{last.ch_out}){'/2' if stride == 2 else ''}"
        return f"{text}@{last.dim_out}"

    # --- forward ------------------------------------------------------------------------------
    def _between(self, h):
        p = self.mid_dropout
        if not self.training or p == 0:
            return h
        mask = torch.empty_like(h).bernoulli_(1.0 - p, generator=self.dropout_generator)
        return h * mask / (1.0 - p)

    def forward_parts(self, x, detach: bool):
        """(unit output before `post`, [(conv input, loss input)] per conv)."""
        ctxs, h, last = [], x, len(self.convs) - 1
        for j, conv in enumerate(self.convs):
            sc = None
            if j == last and self.residual:
                sc = self.shortcut(x) if self.shortcut is not None else x
            out, hl = conv.run(h, sc)
            ctxs.append((h, hl))
            if j < last:
                out = self._between(out)
                h = out.detach() if detach else out
        return out, ctxs

    # --- local losses -------------------------------------------------------------------------
    def local_loss(self, ctxs, y, y_onehot):
        """The sum of the convs' local losses; stats: that sum, then the last conv's sim and
        pred losses and decoder hits (blocks.STAT_FIELDS)."""
        total, stats = None, None
        for conv, (x, hl) in zip(self.convs, ctxs):
            loss, stats = conv.loss_fn(conv, x, hl, y, y_onehot)
            total = loss if total is None else total + loss
        return total, torch.cat([total.detach().float().reshape(1), stats[1:]])


class NormOutputLayer(OutputLayer):
    """The Wide-ResNet head: BatchNorm (momentum 0.9, as the reference) -> ReLU -> average pool
    over the whole map (or max-pool 2 in the adapted variants) -> linear. The BatchNorm is part
    of the output unit and trained with it."""

    def __init__(self, channels: int, size: int, num_classes: int, *, adapted: bool, **kw):
        features = channels * (size // 2) ** 2 if adapted else channels
        super().__init__(features, num_classes, **kw)
        self.adapted, self.size = adapted, size
        with torch.device("meta"):
            self.bn = nn.BatchNorm2d(channels, momentum=0.9)

    def materialize(self) -> None:
        super().materialize()
        with torch.no_grad():
            self.bn.reset_parameters()

    def describe(self) -> str:
        pool = "maxpool2" if self.adapted else f"avgpool{self.size}"
        return f"BN-ReLU-{pool}-Linear({self.linear.in_features}->{self.linear.out_features})"

    def forward(self, x):
        h = F.relu(self.bn(x))
        h = F.max_pool2d(h, 2) if self.adapted else F.avg_pool2d(h, h.shape[-1])
        return self.linear(h.flatten(1))


def _conv(ch_in, ch_out, *, kernel, stride, padding, size, bias, pre_act, post_act, dropout,
          position, common, first_layer=False):
    return ResConv(ch_in, ch_out, kernel_size=kernel, stride=stride, padding=padding,
                   dim_out=_conv_out(size, kernel, stride, padding), bias=bias, pre_act=pre_act,
                   post_act=post_act, position=position, first_layer=first_layer,
                   dropout=dropout, **common)


def _common(model, loss, num_classes: int, seed: int, index: int) -> dict:
    return dict(dim_in_decoder=model.dim_in_decoder, batch_norm=model.batch_norm, index=index,
                seed=seed, num_classes=num_classes, loss=loss, nonlin=model.nonlin)


def build_resnet(model, loss, input_shape, num_classes: int, seed: int):
    """(units, output layer) of resnet18/34/50/101/152 (`--pre-act`: pre-activation convs)."""
    kind, counts = RESNET_DEPTHS[int(model.name[len("resnet"):])]
    return _residual_net(model, loss, input_shape, num_classes, seed, kind=kind, stem_width=64,
                         groups=tuple(zip((64, 128, 256, 512), (1, 2, 2, 2), counts)))


def build_cifar_resnet(model, loss, input_shape, num_classes: int, seed: int):
    """(units, output layer) of the CIFAR ResNet resnet<6n+2> (He et al. 2016, section 4.2): a
    3x3 stem of 16 channels, three groups of n basic blocks of 16, 32 and 64 channels (stride
    1, 2, 2), global average pooling and one linear layer. The shortcut is the identity, or a
    1x1 convolution with BatchNorm where the shape changes (as the InfoPro and AugLocal code
    build it; docs/algorithm.md 5.7)."""
    n = parse_cifar_resnet(model.name)
    return _residual_net(model, loss, input_shape, num_classes, seed, kind="basic", stem_width=16,
                         groups=((16, 1, n), (32, 2, n), (64, 2, n)))


def _residual_net(model, loss, input_shape, num_classes: int, seed: int, *, kind: str,
                  stem_width: int, groups: tuple):
    """A stem conv, then groups of (channels, stride of the first block, blocks) of basic or
    bottleneck blocks, average pooling over the last map, one linear layer."""
    channels, size, _ = input_shape
    pre, p, fm = model.pre_act, model.dropout, model.feat_mult
    width = int(stem_width * fm)
    if width < 1:
        raise ValueError(f"--feat-mult {fm} gives {model.name} a stem of {stem_width * fm:g} < 1 "
                         f"channel; use --feat-mult >= {1 / stem_width:g}")
    stem = _conv(channels, width, kernel=3, stride=1, padding=1, size=size, bias=False,
                 pre_act=False, post_act=not pre, dropout=p, position=0, first_layer=True,
                 common=_common(model, loss, num_classes, seed, 0))
    units = [ConvUnit([stem], index=0, seed=seed, kind="Stem", residual=False)]
    in_planes, expansion = width, (1 if kind == "basic" else 4)
    for base, stride, n in groups:
        planes = int(base * fm)
        for b in range(n):
            s = stride if b == 0 else 1
            c = _common(model, loss, num_classes, seed, len(units))
            act = dict(pre_act=pre, post_act=not pre, dropout=p, bias=False, common=c)
            if kind == "basic":
                convs = [_conv(in_planes, planes, kernel=3, stride=s, padding=1, size=size,
                               position=0, **act)]
                size = convs[0].dim_out
                convs.append(_conv(planes, planes, kernel=3, stride=1, padding=1, size=size,
                                   position=1, **act))
            else:
                convs = [_conv(in_planes, planes, kernel=1, stride=1, padding=0, size=size,
                               position=0, **act)]
                convs.append(_conv(planes, planes, kernel=3, stride=s, padding=1, size=size,
                                   position=1, **act))
                size = convs[1].dim_out
                convs.append(_conv(planes, planes * expansion, kernel=1, stride=1, padding=0,
                                   size=size, position=2, **act))
            out_planes = planes * expansion
            shortcut = None
            if s != 1 or in_planes != out_planes:
                with torch.device("meta"):
                    shortcut = nn.Sequential(
                        nn.Conv2d(in_planes, out_planes, 1, s, bias=False),
                        nn.BatchNorm2d(out_planes))
            units.append(ConvUnit(convs, index=len(units), seed=seed, residual=True,
                                  kind="BasicBlock" if kind == "basic" else "Bottleneck",
                                  shortcut=shortcut))
            in_planes = out_planes
    units[-1].post.append(nn.AvgPool2d(size))  # to 1x1: the linear layer sees the features
    output = OutputLayer(in_planes, num_classes, index=len(units), seed=seed,
                         zero_init=not loss.backprop, loss_scale=output_loss_scale(loss))
    return units, output


def build_wresnet(model, loss, input_shape, num_classes: int, seed: int):
    """(units, output layer) of wresnet<depth>-<width>[a]: pre-activation wide blocks, dropout
    between the convs (plain) or before each conv (adapted, "a")."""
    depth, k, adapted = parse_wresnet(model.name)
    n = (depth - 4) // 6
    channels, size, _ = input_shape
    p, fm = model.dropout, model.feat_mult
    # --feat-mult scales the widths too (1, the default, is the reference's network)
    stages = [max(1, int(c * fm)) for c in (16 * k if adapted else 16, 16 * k, 32 * k, 64 * k)]
    stem = _conv(channels, stages[0], kernel=3, stride=1, padding=1, size=size, bias=True,
                 pre_act=False, post_act=False, dropout=0.0, position=0, first_layer=True,
                 common=_common(model, loss, num_classes, seed, 0))
    units = [ConvUnit([stem], index=0, seed=seed, kind="Stem", residual=False)]
    in_planes = stages[0]
    for planes, stride in zip(stages[1:], (1, 2, 2)):
        for b in range(n):
            s = stride if b == 0 else 1
            act = dict(pre_act=True, post_act=False, dropout=p if adapted else 0.0, bias=True,
                       common=_common(model, loss, num_classes, seed, len(units)))
            conv1 = _conv(in_planes, planes, kernel=3, stride=1, padding=1, size=size,
                          position=0, **act)
            conv2 = _conv(planes, planes, kernel=3, stride=s, padding=1, size=size, position=1,
                          **act)
            size = conv2.dim_out
            shortcut = None
            if s != 1 or in_planes != planes:
                with torch.device("meta"):
                    shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, s, bias=True))
            units.append(ConvUnit([conv1, conv2], index=len(units), seed=seed, residual=True,
                                  kind="WideBlock", shortcut=shortcut,
                                  mid_dropout=0.0 if adapted else p))
            in_planes = planes
    if adapted and size < 2:
        raise ValueError(f"{model.name}: the last map is {size}x{size}, too small for the "
                         "adapted head's max-pool 2; use a larger input or the plain variant")
    output = NormOutputLayer(in_planes, size, num_classes, adapted=adapted, index=len(units),
                             seed=seed, zero_init=not loss.backprop,
                             loss_scale=output_loss_scale(loss))
    return units, output
