"""The built-in models: the reference's mlp and VGGs (docs/algorithm.md section 5), and the
registration of every built-in family (ResNets and Wide-ResNets live in resnets.py, Vision
Transformers in vit.py).

Architecture only: no training logic lives here. A max-pool that follows a block is attached to
that block (`block.post`), so cutting the block list anywhere gives valid pipeline stages.
"""
from __future__ import annotations

from dataclasses import dataclass

from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.models.blocks import LocalConvBlock, LocalLinearBlock, OutputLayer, make_pool, \
    output_loss_scale
from localloss_pp.models.registry import register_model
from localloss_pp.models.resnets import CIFAR_RESNET_PATTERN, build_cifar_resnet, build_resnet, \
    build_wresnet
from localloss_pp.models.vit import VIT_PATTERN, VIT_PRESETS, build_vit

__all__ = ["VGG_CFGS", "build_mlp", "build_vgg"]

VGG_CFGS: dict[str, list] = {
    "vgg6a": [128, "M", 256, "M", 512, "M", 512],
    "vgg6b": [128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8": [64, "M", 128, "M", 256, "M", 512, "M", 512, "M"],
    "vgg8a": [128, 256, "M", 256, 512, "M", 512, "M", 512],
    "vgg8b": [128, 256, "M", 256, 512, "M", 512, "M", 512, "M"],
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg11b": [128, 128, 128, 256, "M", 256, 512, "M", 512, 512, "M", 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


@dataclass(frozen=True)
class _Common:
    seed: int
    num_classes: int
    loss: LossConfig
    nonlin: str
    dropout: float
    batch_norm: bool


def _fc_stack(c: _Common, num_in: int, num_layers: int, num_hidden: int, start: int) -> list:
    """The reference's Net: num_layers local FC blocks (the first flagged first_layer)."""
    blocks = []
    for i in range(num_layers):
        blocks.append(LocalLinearBlock(
            num_in if i == 0 else num_hidden, num_hidden, batch_norm=c.batch_norm,
            index=start + i, seed=c.seed, num_classes=c.num_classes, loss=c.loss,
            dropout=c.dropout, nonlin=c.nonlin, first_layer=i == 0))
    return blocks


@register_model("mlp")
def build_mlp(model: ModelConfig, loss: LossConfig, input_shape, num_classes: int, seed: int):
    """The reference's Net: num_layers local FC blocks and the output layer."""
    channels, input_dim, _ = input_shape
    c = _Common(seed, num_classes, loss, model.nonlin, model.dropout, model.batch_norm)
    blocks = _fc_stack(c, channels * input_dim * input_dim, model.num_layers, model.num_hidden, 0)
    output = OutputLayer(model.num_hidden, num_classes, index=len(blocks), seed=seed,
                         zero_init=not loss.backprop, loss_scale=output_loss_scale(loss))
    return blocks, output


def build_vgg(model: ModelConfig, loss: LossConfig, input_shape, num_classes: int, seed: int):
    """The reference's VGGn: local conv blocks (max-pools travel with the block before them),
    then num_layers local FC blocks, or a plain linear head."""
    channels, input_dim, _ = input_shape
    c = _Common(seed, num_classes, loss, model.nonlin, model.dropout, model.batch_norm)
    local = not loss.backprop
    scale = output_loss_scale(loss)
    blocks: list = []
    ch_in, scale_factor = channels, 1
    for item in VGG_CFGS[model.name]:
        if isinstance(item, str):
            if not blocks:
                raise ValueError(f"{model.name}: a pooling layer cannot come before the first conv")
            blocks[-1].post.append(make_pool(item))
            scale_factor *= 2 if item in ("M", "A", "M3", "A3") else 4
            continue
        ch_out = int(item * model.feat_mult)
        if ch_out < 1:
            raise ValueError(f"--feat-mult {model.feat_mult} gives a {model.name} conv layer "
                             f"{item} x {model.feat_mult} < 1 channel; use --feat-mult >= "
                             f"{1 / min(i for i in VGG_CFGS[model.name] if isinstance(i, int))}")
        first = not blocks
        if first and input_dim > 64:
            kernel, stride, padding = 7, 2, 3
            scale_factor = 2
        else:
            kernel, stride, padding = 3, 1, 1
        blocks.append(LocalConvBlock(
            ch_in, ch_out, kernel_size=kernel, stride=stride, padding=padding,
            dim_out=input_dim // scale_factor, dim_in_decoder=model.dim_in_decoder,
            batch_norm=c.batch_norm, index=len(blocks), seed=seed, num_classes=num_classes,
            loss=loss, dropout=model.dropout, nonlin=model.nonlin, first_layer=first))
        ch_in = ch_out
    output_dim = input_dim // scale_factor
    if output_dim < 1:
        raise ValueError(f"{model.name} pools a {input_dim}x{input_dim} input down to nothing; "
                         "use a larger input or a shallower model")
    head_in = output_dim * output_dim * ch_in
    if model.num_layers > 0:
        blocks += _fc_stack(c, head_in, model.num_layers, model.num_hidden, len(blocks))
        output = OutputLayer(model.num_hidden, num_classes, index=len(blocks), seed=seed,
                             zero_init=local, loss_scale=scale)
    else:  # a plain linear head, not zero-initialised (reference)
        output = OutputLayer(head_in, num_classes, index=len(blocks), seed=seed,
                             zero_init=False, loss_scale=scale)
    return blocks, output


for _name in VGG_CFGS:
    register_model(_name, build_vgg)
for _name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    register_model(_name, build_resnet)
register_model(CIFAR_RESNET_PATTERN, build_cifar_resnet, pattern=True)  # resnet<6n+2>
register_model(r"wresnet\d+-\d+a?", build_wresnet, pattern=True)
for _name in VIT_PRESETS:
    register_model(_name, build_vit)
register_model(VIT_PATTERN, build_vit, pattern=True)
