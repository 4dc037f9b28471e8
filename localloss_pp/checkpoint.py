"""Saving and loading model state: atomic writes, safe loads (weights_only=True)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .models import LocalModel

__all__ = ["atomic_write_bytes", "atomic_torch_save", "save_model", "load_model_state", "unit_states",
           "CheckpointError", "MODEL_FORMAT"]

MODEL_FORMAT = "localloss-pp/model/1"


class CheckpointError(ValueError):
    """A model or checkpoint file is missing, damaged, foreign, or of another model."""


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    _atomic(path, lambda fh: fh.write(data))


def atomic_torch_save(obj, path: Path) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def unit_states(units) -> list[dict]:
    """CPU copies of the units' state dicts (what save_model writes for each unit)."""
    return [{k: v.detach().cpu() for k, v in u.state_dict().items()} for u in units]


def save_model(path: Path, model_name: str, unit_state_list: list[dict], config_toml: str,
               epoch: int, digest: str) -> None:
    """Write every unit's state (blocks, then the output layer), the config, the number of
    epochs trained and the model digest."""
    state = {"format": MODEL_FORMAT, "model": model_name, "config": config_toml,
             "digest": digest, "epoch": epoch, "units": unit_state_list}
    atomic_torch_save(state, path)


def load_model_state(model: LocalModel, path: Path, only=None) -> dict:
    """Load a file written by save_model into `model` (into the units whose index is in `only`,
    all when None); a clear CheckpointError if it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"{path} is not a readable localloss-pp model file ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a localloss-pp model file (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r})")
    units = model.units()
    if state["model"] != model.name or len(state["units"]) != len(units):
        raise CheckpointError(f"{path} holds a {state['model']} with {len(state['units'])} units, "
                              f"not this {model.name} with {len(units)}")
    for unit, sd in zip(units, state["units"]):
        if only is not None and unit.index not in only:
            continue
        try:
            unit.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit unit {unit.index}: "
                                  f"{str(exc).splitlines()[0]}") from None
    return state
