"""Local modules: a model's units grouped into K contiguous modules, each trained by one head
at its end with ordinary backprop inside it (DGL's and InfoPro's K; `--local-modules`,
docs/algorithm.md 10.1).

The grouping turns the builder's plain units (built as for --backprop: no per-layer heads) into
the pipeline units of the run:
- modules 1 .. K-1 become `LocalModule` units: the member units in order, the objective's head
  on the last member's output (before the pools that travel with it), one optimizer, one
  dropout generator;
- the last module joins the output layer in `ModuleOutput`, the output unit: its members and the
  network's own classifier trained end to end with the global cross-entropy, as the DGL,
  InfoPro and AugLocal code train their last module.

Every member keeps its index among the builder's units and initialises its weights from (seed,
that index), so the backbone starts from the same weights whatever K is; a head is initialised
from (seed, index of its module's last unit, "head"). Stage boundaries fall between modules,
and any number of stages computes the same bits as one process (docs/architecture.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from localloss_pp.config import parse_local_modules
from localloss_pp.layout import balanced_split
from localloss_pp.models.blocks import OutputSteps, Unit, _amp_settings, make_optimizer
from localloss_pp.models.objectives import Head, Objective
from localloss_pp.seeds import derive_seed

__all__ = ["LocalModule", "ModuleOutput", "module_sizes", "group_units"]


def _share(parent, member: nn.Module) -> None:
    """The member's units (and their convs) use the parent's dropout generator, autocast
    settings, activation dtype and memory format."""
    for m in member.modules():
        if isinstance(m, Unit):
            m.dropout_generator, m._amp = parent.dropout_generator, parent._amp
            m.act_dtype = parent.act_dtype
            m._channels_last = parent._channels_last and m.channels_last_capable


def _describe_members(members) -> str:
    """The members' names: all of them for up to 2, else the first and the last."""
    if len(members) <= 2:
        return " + ".join(m.describe() for m in members)
    return f"{members[0].describe()} .. {members[-1].describe()} ({len(members)} units)"


def _run_members(members, x):
    """The members' plain forwards (with the pools that follow them), gradients kept."""
    for m in members:
        x = m(x)
    return x


class LocalModule(Unit):
    """Pipeline unit of a local module: `members` (plain units) then `head` on their output."""

    def __init__(self, members: list, head: Head, *, index: int, seed: int):
        super().__init__(index=index, seed=seed)
        self.members = nn.ModuleList(members)
        self.head = head
        self.post = members[-1].post  # the last member's pools travel with the module
        members[-1].post = nn.Sequential()
        self.needs_input = head.needs_input
        self.reports_error = head.reports_error
        self.stat_fields = ("loss", *head.terms, "correct")
        self.channels_last_capable = all(m.channels_last_capable for m in members)

    def materialize(self) -> None:
        for m in self.members:
            m.materialize()
        self.head.to_empty(device="cpu")
        gen = torch.Generator().manual_seed(
            derive_seed(self._seed, self.members[-1].index, "head"))
        with torch.no_grad():
            self.head.init_weights(gen)

    def setup(self, device, optim, **options) -> None:
        super().setup(device, optim, **{k: v for k, v in options.items() if k != "compile"})
        for m in self.members:
            _share(self, m)

    def describe(self) -> str:
        return _describe_members(self.members)

    def forward_parts(self, x, detach: bool, image=None):
        """(module output before `post`, context of the loss): gradients flow through all
        members; `detach` applies only to what leaves the module (Unit.train_forward).
        `image`: the network's input, for a head that reads it."""
        *inner, last = self.members
        h = last.forward_parts(_run_members(inner, x), False)[0]
        return h, (x, h, image)

    def local_loss(self, ctx, y, y_onehot):
        x, h, image = ctx
        if self.needs_input and image is None:
            raise ValueError(f"module {self.index}: its objective reads the network's input, "
                             "but none was given (pass image= to its forward)")
        return self.head.loss(h, y, y_onehot, x=x, image=image)


class ModuleOutput(OutputSteps, nn.Module):
    """The output unit of a grouped model: the last module's members and the network's
    classifier (`classifier`, the builder's output layer), trained end to end with its
    cross-entropy on the (detached) output of the module before."""

    def __init__(self, members: list, classifier: nn.Module, *, index: int, seed: int):
        super().__init__()
        self.index, self._seed = index, seed
        self.members = nn.ModuleList(members)
        self.classifier = classifier
        self.optimizer = None
        self.dropout_generator: torch.Generator | None = None
        self._amp, self.act_dtype, self._channels_last = None, torch.float32, False

    def materialize(self) -> None:
        for m in self.members:
            m.materialize()
        self.classifier.materialize()

    def setup(self, device, optim, *, replica: int = 0, precision: str = "fp32",
              channels_last: bool = False, compile=False) -> None:
        self.to(device)
        self.dropout_generator = torch.Generator(device=device)
        self.dropout_generator.manual_seed(derive_seed(
            self._seed, self.members[0].index,
            "dropout" if replica == 0 else f"dropout/replica{replica}"))
        self._amp = _amp_settings(device, precision)
        for m in self.members:
            _share(self, m)
        self.optimizer = make_optimizer(self.parameters(), optim)

    def describe(self) -> str:
        return f"{_describe_members(self.members)} + {self.classifier.describe()}"

    def forward(self, x):
        return self.classifier(_run_members(self.members, x))

    def loss(self, logits, y):
        return self.classifier.loss(logits, y)


def module_sizes(spec: str, costs: list[float]) -> list[int]:
    """The units of each module for `--local-modules spec` ("" one per unit, "K" balanced by
    `costs`, "3,3,2" as listed); a ValueError that says what does not fit."""
    n = len(costs)
    k, sizes, _ = parse_local_modules(spec)
    if k is None:
        return [1] * n
    if sizes is not None:
        if sum(sizes) != n:
            raise ValueError(f"--local-modules {spec} covers {sum(sizes)} units, but the model "
                             f"has {n}; the sizes must add up to {n}")
        return sizes
    if k > n:
        raise ValueError(f"--local-modules {k}: the model has only {n} units; choose K <= {n}")
    return balanced_split(costs, k)


def group_units(units: list, classifier, objective: Objective, spec: str, *, seed: int,
                make_spec) -> tuple[list, ModuleOutput]:
    """(local modules, output unit) of plain `units` grouped as `spec` says; `make_spec(index,
    num_modules, first, last)` gives each module's ModuleSpec."""
    sizes = module_sizes(spec, [float(sum(p.numel() for p in u.parameters())) for u in units])
    if len(sizes) < 2:
        raise ValueError("--local-modules 1 makes the whole network one module trained end to "
                         "end: that is --backprop; choose K >= 2")
    modules, first = [], 0
    for i, size in enumerate(sizes[:-1]):
        last = first + size - 1
        spec = make_spec(i, len(sizes), first, last)
        with torch.device("meta"):  # heads are built as units are: shapes only
            head = objective.build_head(spec)
        if not isinstance(head, Head):
            raise ValueError(f"objective {objective.name}: its head builder returned "
                             f"{type(head).__name__}, not a localloss_pp Head; see "
                             "docs/usage.md, \"Your own objective\"")
        if tuple(head.terms) != objective.terms:
            raise ValueError(f"objective {objective.name}: its head reports the terms "
                             f"{tuple(head.terms)}, but the objective was registered with "
                             f"{objective.terms}; register it with the head's terms")
        modules.append(LocalModule(units[first:last + 1], head, index=i, seed=seed))
        first = last + 1
    output = ModuleOutput(units[first:], classifier, index=len(modules), seed=seed)
    return modules, output
