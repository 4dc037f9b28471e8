"""The objective registry: `--loss-sup NAME` -> what trains each local module.

An objective is registered with a head builder: given a `ModuleSpec` (the module's output and
input shapes, its position among the modules, the network's input shape, the number of classes,
the config, the model's units), it returns the module's `Head`: an `nn.Module` holding the
auxiliary network(s) that computes the module's local loss and names its terms. The built-in
objectives are entries too (models/heads.py); `--objective-module MODULE` and the entry-point
group `localloss_pp.objectives` register more (docs/usage.md, "Your own objective").

Two granularities (docs/algorithm.md 10.1):
- the paper's objectives (pred, sim, predsim; `layerwise=True`) train every layer with heads of
  its own, built by the blocks themselves, unless `--local-modules` groups the units: then, as
  every other objective, one head at the end of each module;
- the others train one module per unit, or per group of units with `--local-modules K`, with
  ordinary backprop inside a module (models/modules.py).

The config knows no objective code: `--loss-sup` is checked against this registry at launch
(`resolve_objective`), as `--model` is against the model registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.models.blocks import _default_init
from localloss_pp.plugins import import_user_module, load_entry_points

__all__ = ["ModuleSpec", "Head", "Objective", "register_objective", "objective_entry",
           "registered_objectives", "resolve_objective", "stat_fields", "ENTRY_POINT_GROUP",
           "stat_fields_of", "reports_error",
           "PAPER_STAT_FIELDS"]

ENTRY_POINT_GROUP = "localloss_pp.objectives"
# the per-unit statistics of the paper's objectives (and their order in a stats vector)
PAPER_STAT_FIELDS = ("loss", "loss_sim", "loss_pred", "correct")


@dataclass(frozen=True)
class ModuleSpec:
    """What a head builder knows about its local module."""
    index: int                 # the module's position, 0 .. num_modules - 1
    num_modules: int
    out_shape: tuple           # per-example shape of the module's output (before the pools
                               # that travel with it): (C, H, W), (features,) or (tokens, dim)
    in_shape: tuple            # per-example shape of the module's input
    input_shape: tuple         # the network's input (C, H, W)
    num_classes: int
    loss: LossConfig
    model: ModelConfig
    seed: int
    units: tuple = ()          # every unit of the model (plain, on the meta device), in order
    first_unit: int = 0        # the module's units are units[first_unit:last_unit + 1]
    last_unit: int = 0
    input_mean: tuple = ()     # the dataset's per-channel normalisation of the input, if known
    input_std: tuple = ()


class Head(nn.Module):
    """A module's auxiliary network(s) and its local loss.

    A subclass sets `terms` (the names of the loss terms it reports, e.g. ("loss_pred",
    "loss_recon")), builds its layers in __init__ (on the meta device: `torch.device("meta")`
    is active while a builder runs) and implements `loss`. `needs_input`: the objective reads
    the network's input (the image after augmentation) at every module; the pipeline then
    sends it along with the activations. `reports_error`: the last value of the stats counts
    correct guesses of a classifier, reported as the module's error."""

    terms: tuple[str, ...] = ()
    needs_input: bool = False
    reports_error: bool = True

    def loss(self, h: torch.Tensor, y: torch.Tensor, y_onehot: torch.Tensor, *,
             x: torch.Tensor, image: torch.Tensor | None):  # pragma: no cover - abstract
        """(loss, stats) of one batch: `h` the module's output (gradients flow back into the
        module), `x` its input, `image` the network's input (or None). stats: a float32 vector
        (loss, *terms, correct), detached: use `self.stats(...)`."""
        raise NotImplementedError

    @staticmethod
    def stats(loss: torch.Tensor, terms: list[torch.Tensor], correct: torch.Tensor):
        return torch.stack([t.detach().float().reshape(()) for t in (loss, *terms, correct)])

    def init_weights(self, gen: torch.Generator) -> None:
        """Initialise the head's weights from `gen` after it is allocated (default: PyTorch's
        default init of linear and conv layers drawn from `gen`, BatchNorm and LayerNorm
        reset)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                _default_init(module, gen)
            elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                module.reset_parameters()

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Objective:
    """A registry entry."""
    name: str
    build_head: Callable[[ModuleSpec], Head]
    terms: tuple[str, ...]
    layerwise: bool = False    # without --local-modules every layer trains with its own heads
    needs_input: bool = False
    description: str = ""

    @property
    def stat_fields(self) -> tuple[str, ...]:
        return stat_fields(self.terms)


def stat_fields(terms) -> tuple[str, ...]:
    """A unit's statistics: the total loss, the objective's terms, the correct guesses."""
    return ("loss", *terms, "correct")


def stat_fields_of(units) -> tuple[str, ...]:
    """The statistics fields of a model's (or a stage's) units; the paper's for units that do
    not say."""
    return tuple(getattr(units[0], "stat_fields", PAPER_STAT_FIELDS)) if units else \
        PAPER_STAT_FIELDS


def reports_error(unit) -> bool:
    """Whether a unit's statistics count the correct guesses of a classifier of its own."""
    return getattr(unit, "reports_error", hasattr(unit, "decoder_y"))


_REGISTRY: dict[str, Objective] = {}


def register_objective(name: str, build_head: Callable | None = None, *, terms,
                       layerwise: bool = False, needs_input: bool = False,
                       description: str = ""):
    """Register `build_head` for `--loss-sup name`; usable as a decorator. `build_head(spec)`
    returns the `Head` of one module; `terms` are the names of the loss terms its heads report
    (besides the total and the correct guesses), `needs_input` whether they read the network's
    input, `description` a line for the help text."""
    terms = tuple(terms)
    bad = [t for t in terms if not t.isidentifier() or t in ("loss", "correct", "error", "index")]
    if bad:
        raise ValueError(f"objective {name}: term names must be identifiers other than loss, "
                         f"correct, error and index; got {bad}")

    def add(fn):
        _REGISTRY[name.lower()] = Objective(name.lower(), fn, terms, layerwise, needs_input,
                                            description)
        return fn
    return add if build_head is None else add(build_head)


def objective_entry(name: str) -> Objective | None:
    """The entry registered for `name` (installed packages' entry points included)."""
    key = name.lower()
    if key not in _REGISTRY:
        load_entry_points(ENTRY_POINT_GROUP, "objective")
    return _REGISTRY.get(key)


def registered_objectives() -> list[str]:
    return sorted(_REGISTRY)


def resolve_objective(lo: LossConfig) -> Objective:
    """Check `--loss-sup` (and `--objective-module`) at launch, canonicalise the name and
    return its entry; a ValueError that names the flag and the choices. Idempotent."""
    if lo.module:
        import_user_module(lo.module, "--objective-module", "an objective module",
                           "only define and register objectives", "examples.custom_objective")
    entry = objective_entry(lo.loss_sup)
    if entry is None:
        raise ValueError(f"unknown local objective {lo.loss_sup!r} (--loss-sup); choose one of: "
                         f"{', '.join(registered_objectives())}; or register your own and name "
                         "its module with --objective-module; see "
                         "docs/usage.md, \"Your own objective\"")
    lo.loss_sup = entry.name
    if not entry.layerwise and not lo.backprop:
        if not lo.detach:
            raise ValueError(f"--no-detach sends the global gradient through the paper's "
                             f"per-layer losses; {entry.name} trains modules with heads of its "
                             "own: drop --no-detach")
        if lo.bio:
            raise ValueError(f"--bio changes the paper's local losses; {entry.name} has none of "
                             "them: drop --bio, or use --loss-sup pred, sim or predsim")
        if lo.loss_unsup != "none":
            raise ValueError(f"--loss-unsup {lo.loss_unsup} adds the paper's unsupervised loss "
                             f"to each layer; {entry.name} trains modules with its own heads: "
                             "drop --loss-unsup, or use --loss-sup pred, sim or predsim")
    return entry
