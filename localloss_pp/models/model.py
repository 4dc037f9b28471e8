"""A model: an ordered list of pipeline units plus an output layer, built by the builder that
the registry names; its parameter count and its digests."""
from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn as nn

from localloss_pp.config import LossConfig, ModelConfig
from localloss_pp.errors import first_line
from localloss_pp.models.blocks import OutputLayer
from localloss_pp.models.modules import group_units
from localloss_pp.models.objectives import PAPER_STAT_FIELDS, ModuleSpec, objective_entry, \
    registered_objectives
from localloss_pp.models.registry import check_units, model_builder, registered_models

__all__ = ["LocalModel", "build_model", "count_params", "model_digest", "unit_digest",
           "state_digest", "states_digest", "combine_digests", "verified_digest"]


class LocalModel(nn.Module):
    """An ordered list of blocks and the output layer. `forward` is the inference chain."""

    def __init__(self, blocks: list, output: OutputLayer, name: str):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.output = output
        self.name = name
        self.stat_fields = PAPER_STAT_FIELDS  # what each block's statistics vector holds

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


def build_model(model: ModelConfig, loss: LossConfig, input_shape: tuple[int, int, int],
                num_classes: int, seed: int, materialize=None,
                input_norm: tuple | None = None) -> LocalModel:
    """Build `model.name` for inputs of shape (channels, size, size), trained by the objective
    `loss.loss_sup`.

    Units (blocks, then the output layer) are created on the meta device; the units whose
    index is in `materialize` (all when None) are then allocated and initialised on the CPU.
    Every block gets `in_shape`/`out_shape`: its per-sample input and (pooled) output shapes.
    An objective that trains modules (all but the paper's per-layer losses, and every one under
    --local-modules) gets the builder's plain units grouped into local modules
    (models/modules.py). `input_norm`: the dataset's (mean, std) per channel, for heads that
    reconstruct the input image.
    """
    entry = None if loss.backprop else objective_entry(loss.loss_sup)
    if not loss.backprop and entry is None:
        raise ValueError(f"unknown local objective {loss.loss_sup!r} (--loss-sup); choose one "
                         f"of: {', '.join(registered_objectives())}")
    grouped = entry is not None and (bool(loss.local_modules) or not entry.layerwise)
    units, output = _build(model, dataclasses.replace(loss, backprop=True) if grouped else loss,
                           input_shape, num_classes, seed)
    _shape_pass(model.name, units, output, input_shape)
    if grouped:
        units, output = _group(model, loss, entry, units, output, input_shape, num_classes, seed,
                               input_norm or ((), ()))
        _shape_pass(model.name, units, output, input_shape)
    fields = {tuple(getattr(u, "stat_fields", PAPER_STAT_FIELDS)) for u in units}
    if len(fields) > 1:
        raise ValueError(f"model {model.name}: its units report different statistics "
                         f"({sorted(fields)}); every unit of a model reports the same fields")
    net = LocalModel(units, output, model.name)
    net.stat_fields = fields.pop()
    for unit in net.units():
        if materialize is None or unit.index in materialize:
            unit.materialize()
    return net


def _shape_pass(name: str, units: list, output, input_shape) -> None:
    """Every unit's `in_shape`/`out_shape` from a shape-only pass on the meta device."""
    x = torch.empty(2, *input_shape, device="meta")
    for block in [*units, output]:
        where = "the output layer" if block is output else f"block {block.index + 1}"
        try:
            block.eval()
            y = block(x)
            block.train()
        except Exception as exc:  # a builder whose units' widths do not chain
            raise ValueError(f"model {name}: {where} ({type(block).__name__}) failed on "
                             f"the previous unit's output of shape {list(x.shape[1:])} per "
                             f"example in a shape-only pass on the meta device "
                             f"({type(exc).__name__}: {first_line(exc)}); check that its input "
                             "width matches") from exc
        if block is not output:
            block.in_shape, block.out_shape = tuple(x.shape[1:]), tuple(y.shape[1:])
            x = y


def _group(model, loss, entry, units, output, input_shape, num_classes: int, seed: int,
           input_norm: tuple):
    """The plain units grouped into local modules with the objective's heads."""
    def make_spec(index, num_modules, first, last):
        unit = units[last]
        unit.eval()  # its output before the pools that travel with it
        h = unit.forward_parts(torch.empty(2, *unit.in_shape, device="meta"), False)[0]
        unit.train()
        return ModuleSpec(index=index, num_modules=num_modules, out_shape=tuple(h.shape[1:]),
                          in_shape=units[first].in_shape, input_shape=tuple(input_shape),
                          num_classes=num_classes, loss=loss, model=model, seed=seed,
                          units=tuple(units), first_unit=first, last_unit=last,
                          input_mean=tuple(input_norm[0]), input_std=tuple(input_norm[1]))
    try:
        return group_units(units, output, entry, loss.local_modules, seed=seed,
                           make_spec=make_spec)
    except ValueError:
        raise
    except Exception as exc:  # a user's head builder failing in its own code
        raise ValueError(f"objective {entry.name}: building its heads for {model.name} failed "
                         f"({type(exc).__name__}: {first_line(exc)}); set LOCALLOSS_PP_DEBUG=1 "
                         "for the traceback") from exc


def _build(model: ModelConfig, loss: LossConfig, input_shape, num_classes: int,
           seed: int) -> tuple[list, nn.Module]:
    builder = model_builder(model.name)
    if builder is None:
        raise ValueError(f"unknown model {model.name!r}; choose one of "
                         f"{', '.join(registered_models())}, a wresnet<depth>-<width>[a] or a "
                         "vit-<depth>-<dim>[-p<patch>][-h<heads>][-m<ratio>]")
    try:
        units, output = builder(model, loss, input_shape, num_classes, seed)
    except ValueError:
        raise  # a builder's own message (e.g. a model that does not fit the input size)
    except Exception as exc:  # a user's builder failing in its own code
        fn = getattr(builder, "__qualname__", repr(builder))
        raise ValueError(f"model {model.name}: its builder {builder.__module__}.{fn} failed "
                         f"({type(exc).__name__}: {first_line(exc)}); set LOCALLOSS_PP_DEBUG=1 "
                         "for the traceback") from exc
    check_units(model.name, units, output)
    return units, output


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


def states_digest(unit_states: list[dict]) -> str:
    """The model digest of a whole model's unit state dicts, in unit order (as model.pt holds
    them): what model_digest gives for a model holding those states."""
    return combine_digests([state_digest(i, sd) for i, sd in enumerate(unit_states)])


def verified_digest(state: dict, path) -> str:
    """The digest of the weights in a loaded model file (`path` only names it in errors); a
    ValueError when they cannot be read or no longer have the digest they were saved with."""
    try:
        computed = states_digest(state["units"])
    except Exception as exc:  # not a list of state dicts of tensors
        raise ValueError(f"{path} is damaged: its weights cannot be read "
                         f"({first_line(exc)})") from None
    if computed != state.get("digest"):
        raise ValueError(f"{path} is damaged: its weights do not have the digest they were "
                         f"saved with ({str(state.get('digest'))[:16]}, now {computed[:16]}); "
                         "use a copy or a checkpoint of the run")
    return computed


def model_digest(model: LocalModel) -> str:
    """sha256 over every block's and the output layer's parameters and buffers, in block order."""
    return combine_digests([unit_digest(u) for u in model.units()])
