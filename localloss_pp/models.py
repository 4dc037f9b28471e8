"""Models as ordered lists of locally trained blocks plus an output layer (SPEC.md section 5).

Architecture only: no training logic lives here. A max-pool that follows a block is attached to
that block (`block.post`), so cutting the block list anywhere gives valid pipeline stages.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .blocks import LocalConvBlock, LocalLinearBlock, OutputLayer, make_pool, output_loss_scale
from .config import LossConfig, ModelConfig, first_line
from .resnets import build_resnet, build_wresnet

__all__ = ["VGG_CFGS", "LocalModel", "build_model", "count_params", "model_digest", "unit_digest",
           "state_digest", "combine_digests", "register_model", "model_builder",
           "registered_models", "load_model_module", "build_mlp", "build_vgg", "UNIT_METHODS"]

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


class LocalModel(nn.Module):
    """An ordered list of blocks and the output layer. `forward` is the inference chain."""

    def __init__(self, blocks: list, output: OutputLayer, name: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.output = output
        self.name = name

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def units(self) -> list[nn.Module]:
        """Every unit that owns an optimizer, in order: the blocks, then the output layer."""
        return [*self.blocks, self.output]

    def setup_units(self, keep: set[int], device, optim, **options) -> None:
        """Allocate, initialise and move the units in `keep` and create their optimizers
        (`options`: replica, precision, channels_last, compile; see LocalBlock.setup)."""
        for unit in self.units():
            if unit.index in keep:
                unit.materialize()
                unit.setup(device, optim, **options)


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


def build_model(model: ModelConfig, loss: LossConfig, input_shape: tuple[int, int, int],
                num_classes: int, seed: int, materialize=None) -> LocalModel:
    """Build `model.name` for inputs of shape (channels, size, size).

    Units (blocks, then the output layer) are created on the meta device; the units whose
    index is in `materialize` (all when None) are then allocated and initialised on the CPU.
    Every block gets `in_shape`/`out_shape`: its per-sample input and (pooled) output shapes.
    """
    net = _build(model, loss, input_shape, num_classes, seed)
    x = torch.empty(2, *input_shape, device="meta")
    for block in net.blocks:
        block.in_shape = tuple(x.shape[1:])
        block.eval()
        x = block(x)
        block.train()
        block.out_shape = tuple(x.shape[1:])
    for unit in net.units():
        if materialize is None or unit.index in materialize:
            unit.materialize()
    return net


# --- the model registry: --model NAME -> builder -----------------------------------------------
Builder = Callable[[ModelConfig, LossConfig, tuple, int, int], tuple]
_REGISTRY: dict[str, Builder] = {}
_PATTERNS: list[tuple[re.Pattern, Builder]] = []
ENTRY_POINT_GROUP = "localloss_pp.models"
UNIT_METHODS = ("train_forward", "local_backward", "step", "train_update", "evaluate", "forward",
                "materialize", "setup", "set_lr", "describe")
OUTPUT_METHODS = ("forward", "materialize", "setup", "set_lr", "describe", "train_update",
                  "train_backward", "predict", "loss", "step")


def register_model(name: str, builder: Builder | None = None, *, pattern: bool = False):
    """Register `builder` for `--model name` (a regular expression over the whole name with
    `pattern=True`); usable as a decorator. A builder is called as
    builder(model_cfg, loss_cfg, input_shape, num_classes, seed) and returns
    (units, output layer): the ordered pipeline units (index 0..n-1) and the output layer
    (index n), built on the meta device (README "Your own model")."""
    def add(fn: Builder) -> Builder:
        if pattern:
            _PATTERNS.append((re.compile(name), fn))
        else:
            _REGISTRY[name.lower()] = fn
        return fn
    return add if builder is None else add(builder)


def load_model_module(path: str) -> None:
    """Import a user's module that registers models (--model-module); a one-line error if it
    cannot be imported."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules beside the run
    try:
        importlib.import_module(path)
    except Exception as exc:  # ImportError, or any error inside the user's module
        raise ValueError(f"--model-module {path}: cannot import it ({type(exc).__name__}: "
                         f"{first_line(exc)}); give an importable module path (on PYTHONPATH "
                         "or installed), e.g. examples.custom_model") from None


def _load_entry_points() -> None:
    from importlib.metadata import entry_points
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as exc:
            raise ValueError(f"the model entry point {ep.name} ({ep.value}) of an installed "
                             f"package cannot be loaded: {first_line(exc)}") from None


def model_builder(name: str) -> Builder | None:
    """The builder registered for `name` (installed packages' entry points included)."""
    key = name.lower()
    for attempt in range(2):
        if key in _REGISTRY:
            return _REGISTRY[key]
        for regex, fn in _PATTERNS:
            if regex.fullmatch(key):
                return fn
        if attempt == 0:
            _load_entry_points()
    return None


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def _check_units(name: str, units: list, output) -> None:
    """A clear error when a (user's) builder returns something the runtime cannot run."""
    if not units:
        raise ValueError(f"model {name}: its builder returned no units")
    for i, unit in enumerate([*units, output]):
        wanted = OUTPUT_METHODS if unit is output else UNIT_METHODS
        missing = [m for m in wanted if not callable(getattr(unit, m, None))]
        if missing or getattr(unit, "index", None) != i:
            what = f"lacks {', '.join(missing)}" if missing else \
                f"has index {getattr(unit, 'index', None)}, not {i}"
            raise ValueError(f"model {name}: {'the output layer' if unit is output else 'unit'} "
                             f"{i} ({type(unit).__name__}) {what}; see README \"Your own "
                             "model\"")


def _build(model: ModelConfig, loss: LossConfig, input_shape, num_classes: int,
           seed: int) -> LocalModel:
    builder = model_builder(model.name)
    if builder is None:
        raise ValueError(f"unknown model {model.name!r}; choose one of "
                         f"{', '.join(registered_models())} or a wresnet<depth>-<width>[a]")
    units, output = builder(model, loss, input_shape, num_classes, seed)
    _check_units(model.name, units, output)
    return LocalModel(units, output, model.name)


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
register_model(r"wresnet\d+-\d+a?", build_wresnet, pattern=True)


def count_params(model: ModelConfig, input_shape, num_classes: int) -> int:
    """The paper's "#Params": the backprop-mode model (no local heads), BN affine included."""
    bp = build_model(model, LossConfig(backprop=True), input_shape, num_classes, seed=0,
                     materialize=())
    return sum(p.numel() for p in bp.parameters())


def unit_digest(unit: nn.Module) -> str:
    """sha256 over one unit's parameters and buffers (names, dtypes, shapes and bytes)."""
    return state_digest(unit.index, unit.state_dict())


def state_digest(index: int, state: dict) -> str:
    """unit_digest of the unit `index` whose state dict is `state` (e.g. read from a file)."""
    h = hashlib.sha256()
    for name, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{index}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def combine_digests(unit_digests: list[str]) -> str:
    """The model digest: sha256 over the units' digests in unit order (blocks, then output)."""
    return hashlib.sha256("".join(unit_digests).encode()).hexdigest()


def model_digest(model: LocalModel) -> str:
    """sha256 over every block's and the output layer's parameters and buffers, in block order."""
    return combine_digests([unit_digest(u) for u in model.units()])
