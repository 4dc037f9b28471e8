"""The model registry: `--model NAME` -> builder; `--model-module` and entry points; the unit
protocol every pipeline unit follows; the launch-time check of a model name.

A builder is called as builder(model_cfg, loss_cfg, input_shape, num_classes, seed) and returns
(units, output layer) built on the meta device (docs/usage.md, "Your own model"). The unit
protocol (`UNIT_METHODS`, `OUTPUT_METHODS`, `UNIT_STATE`) is everything the pipeline, checkpoints
and resume call or read on a unit; `models.blocks.Unit` implements it.
"""
from __future__ import annotations

import re
from typing import Callable

from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.plugins import import_user_module, load_entry_points
from localloss_pp.models.resnets import parse_cifar_resnet, parse_wresnet
from localloss_pp.models.vit import VIT_PRESETS, is_vit, parse_vit

__all__ = ["register_model", "model_builder", "registered_models", "load_model_module",
           "import_user_module", "load_entry_points",
           "resolve_model", "check_units", "UNIT_METHODS", "OUTPUT_METHODS", "UNIT_STATE",
           "ENTRY_POINT_GROUP", "BUILTIN_MODELS"]

# --- the model registry: --model NAME -> builder -----------------------------------------------
Builder = Callable[[ModelConfig, LossConfig, tuple, int, int], tuple]
_REGISTRY: dict[str, Builder] = {}
_PATTERNS: list[tuple[re.Pattern, Builder]] = []
ENTRY_POINT_GROUP = "localloss_pp.models"
UNIT_METHODS = ("train_forward", "local_backward", "step", "train_update", "evaluate", "forward",
                "materialize", "setup", "set_lr", "describe")
OUTPUT_METHODS = ("forward", "materialize", "setup", "set_lr", "describe", "train_update",
                  "train_backward", "predict", "loss", "step")
# What checkpoints and resume read and restore on a pipeline unit besides its state_dict and its
# optimizer's: its dropout generator (None for a unit without one).
UNIT_STATE = ("dropout_generator",)


def register_model(name: str, builder: Builder | None = None, *, pattern: bool = False):
    """Register `builder` for `--model name` (a regular expression over the whole name with
    `pattern=True`); usable as a decorator. A builder is called as
    builder(model_cfg, loss_cfg, input_shape, num_classes, seed) and returns
    (units, output layer): the ordered pipeline units (index 0..n-1) and the output layer
    (index n), built on the meta device (docs/usage.md, "Your own model")."""
    def add(fn: Builder) -> Builder:
        if pattern:
            _PATTERNS.append((re.compile(name), fn))
        else:
            _REGISTRY[name.lower()] = fn
        return fn
    return add if builder is None else add(builder)


def load_model_module(path: str) -> None:
    """Import a user's module that registers models (--model-module)."""
    import_user_module(path, "--model-module", "a model module",
                       "only define and register models", "examples.custom_model")


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
            load_entry_points(ENTRY_POINT_GROUP, "model")
    return None


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def check_units(name: str, units: list, output) -> None:
    """A clear error when a (user's) builder returns something the runtime cannot run."""
    if not units:
        raise ValueError(f"model {name}: its builder returned no units")
    for i, unit in enumerate([*units, output]):
        wanted = OUTPUT_METHODS if unit is output else UNIT_METHODS
        missing = [m for m in wanted if not callable(getattr(unit, m, None))]
        if missing or getattr(unit, "index", None) != i:
            what = f"lacks {', '.join(missing)}" if missing else \
                f"has index {getattr(unit, 'index', None)}, not {i}"
            part = "the output layer" if unit is output else "unit"
            raise ValueError(f"model {name}: {part} {i} ({type(unit).__name__}) {what}; "
                             "see docs/usage.md, \"Your own model\"")


# The built-in names (Wide-ResNets: any wresnet<6n+4>-<k>[a]).
BUILTIN_MODELS = ("mlp", "vgg6a", "vgg6b", "vgg8", "vgg8a", "vgg8b", "vgg11", "vgg11b", "vgg13",
                  "vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                  "wresnet10-8", "wresnet10-8a", "wresnet16-4", "wresnet16-4a", "wresnet16-8",
                  "wresnet16-8a", "wresnet28-10", "wresnet28-10a", "wresnet40-10", "wresnet40-10a")


def resolve_model(m: ModelConfig) -> None:
    """Check `--model` (and `--model-module`, `--pre-act`) at launch and canonicalise the name; a
    ValueError that names the flag and the choices. Idempotent."""
    if m.module:  # a user's models register themselves when their module is imported
        load_model_module(m.module)
    lower = m.name.lower()
    if lower.startswith("wresnet"):  # any wresnet<6n+4>-<k>[a], not only the table's
        m.name = lower
        parse_wresnet(m.name)
    elif is_vit(lower):  # any vit-<depth>-<dim>[-p<patch>][-h<heads>][-m<ratio>], or a preset
        m.name = lower
        parse_vit(m.name)
    elif lower in BUILTIN_MODELS:
        m.name = lower
    elif lower.startswith("resnet"):  # a CIFAR ResNet resnet<6n+2>
        m.name = lower
        parse_cifar_resnet(m.name)
    elif model_builder(m.name) is None:
        raise ValueError(f"unknown model {m.name!r} (--model); choose one of: "
                         f"{', '.join(registered_models())}, resnet<6n+2> (CIFAR ResNets: "
                         "resnet20, resnet32, resnet110, ...), wresnet<depth>-<width>[a], "
                         "vit-<depth>-<dim>[-p<patch>][-h<heads>][-m<ratio>]; or "
                         "register your own and name its module with --model-module "
                         "(docs/usage.md, \"Your own model\")")
    if m.pre_act and not m.name.startswith("resnet"):
        raise ValueError(f"--pre-act chooses the pre-activation ResNet (resnet18 ... resnet152); "
                         f"{m.name} has no such variant (Wide-ResNet blocks are always "
                         "pre-activation): drop --pre-act")
