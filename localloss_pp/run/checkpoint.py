"""Saving and loading model state: atomic writes, safe loads (weights_only=True)."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from localloss_pp.durable import fsync_dir, make_dirs
from localloss_pp.errors import first_line
from localloss_pp.faults import fault_point
from localloss_pp.models import LocalModel, verified_digest

__all__ = ["atomic_write_bytes", "atomic_torch_save", "save_model", "read_model_file",
           "load_model_state", "unit_states",
           "semantic_config", "checkpoint_name", "unit_checkpoint", "restore_unit",
           "save_stage_checkpoint", "write_manifest", "read_manifest", "list_checkpoints",
           "latest_checkpoint", "load_units", "prune_checkpoints", "MANIFEST",
           "CheckpointError", "MODEL_FORMAT"]

MODEL_FORMAT = "localloss-pp/model/1"


class CheckpointError(ValueError):
    """A model or checkpoint file is missing, damaged, foreign, or of another model."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Every file a run writes gets the permissions the user's umask gives (0644 with the usual
# 022), like the files of any other program; read once, at import.
FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write, before_rename=None) -> None:
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)  # mkstemp makes 0600
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the new name itself is durable only with its directory
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno and not exc.filename:  # name the file
            raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes, before_rename=None) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    _atomic(path, lambda fh: fh.write(data), before_rename)


def atomic_torch_save(obj, path: Path) -> None:
    _atomic(path, lambda fh: torch.save(obj, fh))


def unit_states(units) -> list[dict]:
    """CPU copies of the units' state dicts (what save_model writes for each unit)."""
    return [{k: v.detach().cpu() for k, v in u.state_dict().items()} for u in units]


def save_model(path: Path, model_name: str, unit_state_list: list[dict], config_toml: str,
               epoch: int, digest: str, dataset: dict | None = None) -> None:
    """Write every unit's state (blocks, then the output layer), the config, the number of
    epochs trained, the model digest and the dataset's info (DatasetInfo.to_dict: input shape,
    classes, normalisation), which loading the model for inference needs."""
    state = {"format": MODEL_FORMAT, "model": model_name, "config": config_toml,
             "digest": digest, "epoch": epoch, "units": unit_state_list}
    if dataset is not None:
        state["dataset"] = dataset
    atomic_torch_save(state, path)


def read_model_file(path: Path) -> dict:
    """The contents of a file written by save_model, after checking its format and that its
    weights still have the digest they were saved with; a clear CheckpointError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist" if not path.exists() else
                              f"model file {path} is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or not a torch file
        raise CheckpointError(f"{path} is not a readable localloss-pp model file "
                              f"({first_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path} is not a localloss-pp model file (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r})")
    try:
        verified_digest(state, path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    return state


def load_model_state(model: LocalModel, path: Path, only=None, state: dict | None = None) -> dict:
    """Load a file written by save_model into `model` (into the units whose index is in `only`,
    all when None), verified by read_model_file (or its contents `state`, already read so); a
    clear CheckpointError if it does not fit."""
    path = Path(path)
    state = read_model_file(path) if state is None else state
    units = model.units()
    if state["model"] != model.name or len(state["units"]) != len(units):
        raise CheckpointError(f"{path} holds a {state['model']} with {len(state['units'])} units, "
                              f"not this {model.name} with {len(units)}")
    for unit, sd in zip(units, state["units"]):
        if only is not None and unit.index not in only:
            continue
        _check_fits(path, unit, sd)
        try:
            unit.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"{path} does not fit unit {unit.index}: "
                                  f"{first_line(exc)}") from None
    return state


def _check_fits(path, unit, saved: dict) -> None:
    """A CheckpointError naming the first tensor of `unit` that `saved` lacks, has too many, or
    holds in another shape (with both shapes)."""
    own = unit.state_dict()
    where = f"{path} does not fit unit {unit.index} ({type(unit).__name__} {unit.describe()})"
    for name, tensor in own.items():
        if name not in saved:
            raise CheckpointError(f"{where}: the file has no {name}; it was written for "
                                  "another model")
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: {name} has shape {list(saved[name].shape)} in the "
                                  f"file but {list(tensor.shape)} in this model; resume with "
                                  "the model settings it was trained with (see its config)")
    extra = [n for n in saved if n not in own]
    if extra:
        raise CheckpointError(f"{where}: the file has {extra[0]}, which this model does not; "
                              "it was written for another model")


# --- training checkpoints: one file per stage plus a manifest --------------------------------
CKPT_FORMAT = "localloss-pp/checkpoint/1"
MANIFEST = "manifest.json"
# config fields that change the computed numbers; everything else may differ on resume
SEMANTIC = {"model": None, "loss": None, "optim": None,
            "data": ("dataset", "batch_size", "classes_per_batch",
                     "classes_per_batch_until_epoch", "cutout", "n_holes", "length", "augment",
                     "mean", "std", "image_size", "image_mode", "val_fraction", "in_memory"),
            "train": ("seed",)}


def semantic_config(cfg) -> dict:
    """The part of a config that a checkpoint must agree with to be resumed exactly."""
    out = {}
    for section, keep in SEMANTIC.items():
        values = dataclasses.asdict(getattr(cfg, section))
        out[section] = {k: v for k, v in values.items() if keep is None or k in keep}
    if out["data"]["dataset"].startswith("folder:"):  # where the folder is does not count:
        out["data"]["dataset"] = "folder:"             # its file list is checked instead
    return out


def checkpoint_name(epoch: int, step: int | None) -> str:
    """Folder name; `step` = batches done in `epoch`, None at the end of the epoch."""
    return f"e{epoch:05d}-end" if step is None else f"e{epoch:05d}-s{step:07d}"


def unit_checkpoint(unit) -> dict:
    """Everything a unit needs to continue exactly: weights, buffers, optimizer, generator."""
    out = {"state": {k: v.detach().cpu() for k, v in unit.state_dict().items()},
           "optim": unit.optimizer.state_dict()}
    gen = getattr(unit, "dropout_generator", None)
    if gen is not None:
        out["generator"] = gen.get_state()
    return out


def restore_unit(unit, saved: dict) -> None:
    unit.load_state_dict(saved["state"])
    unit.optimizer.load_state_dict(saved["optim"])
    if "generator" in saved and getattr(unit, "dropout_generator", None) is not None:
        unit.dropout_generator.set_state(saved["generator"])


def save_stage_checkpoint(folder: Path, stage_index: int, payload: dict, token: str = "",
                          epoch: int | None = None, step: int | None = None) -> None:
    """Atomically write stage{k}.pt, then its sidecar stage{k}.json with the sha256 and the
    run attempt's `token`. A manifest left in the folder by an earlier attempt goes first: the
    folder is not a complete checkpoint again until the last stage writes the new one."""
    (Path(folder) / MANIFEST).unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save(dict(payload, format=CKPT_FORMAT, stage=stage_index), buf)
    data = buf.getvalue()
    name = f"stage{stage_index}.pt"
    atomic_write_bytes(folder / name, data, before_rename=lambda: fault_point(
        "inside-stage-checkpoint", epoch, step))
    side = {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "units": sorted(int(u) for u in payload.get("units", {})), "token": token}
    atomic_write_bytes(folder / f"stage{stage_index}.json", json.dumps(side).encode())


def _sidecar(path: Path, token: str) -> dict | None:
    """A stage's sidecar if it is there and belongs to this attempt (an earlier, killed
    attempt may have left one of the same name)."""
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return side if side.get("token", "") == token else None


def write_manifest(folder: Path, num_stages: int, info: dict, timeout_s: float,
                   token: str = "") -> dict:
    """Wait until every stage's sidecar of this attempt is there, then write the manifest
    (last, atomically)."""
    deadline = time.monotonic() + timeout_s
    sides = []
    for k in range(num_stages):
        path = folder / f"stage{k}.json"
        while (side := _sidecar(path, token)) is None:
            if time.monotonic() > deadline:
                raise CheckpointError(f"stage {k + 1}/{num_stages} did not write its part of "
                                      f"checkpoint {folder} within {timeout_s:.0f}s")
            time.sleep(0.01)
        sides.append(side)
    fault_point("before-manifest", info.get("epoch"), info.get("step"))
    manifest = dict(info, format=CKPT_FORMAT, num_stages=num_stages,
                    files={s["file"]: s["sha256"] for s in sides},
                    units={str(u): s["file"] for s in sides for u in s["units"]},
                    versions={"torch": torch.__version__, "localloss_pp": _version()})
    manifest["sha256"] = _manifest_sum(manifest)
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


_NAME = re.compile(r"e\d{5}-(end|s\d{7})")  # a folder named like a checkpoint (not a copy)


def _manifest_sum(manifest: dict) -> str:
    """sha256 over a manifest's fields (but this sum), in a canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_manifest(folder: Path, manifest: dict) -> None:
    """A CheckpointError when a manifest is not the one its run wrote for this folder: its
    checksum, its fields, and the epoch and batch of the folder's name."""
    path = Path(folder) / MANIFEST
    if "sha256" not in manifest:  # written before 0.3.0, when manifests had no checksum
        logging.getLogger(__name__).warning(
            "%s has no checksum (written by localloss-pp %s): its fields are not verified",
            path, manifest.get("versions", {}).get("localloss_pp", "before 0.3.0"))
    elif manifest["sha256"] != _manifest_sum(manifest):
        raise CheckpointError(f"{path} is damaged (its checksum does not match its fields)")
    try:
        epoch, step = manifest["epoch"], manifest["step"]
        expected = checkpoint_name(epoch, step)
        fields_ok = (manifest["complete_epochs"] == (epoch if step is None else epoch - 1)
                     and isinstance(manifest["files"], dict)
                     and isinstance(manifest["units"], dict))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path} is damaged (fields missing or of the wrong type)") from None
    if not fields_ok:
        raise CheckpointError(f"{path} is damaged (its fields contradict each other)")
    if _NAME.fullmatch(Path(folder).name) and expected != Path(folder).name:
        raise CheckpointError(f"{path} describes checkpoint {expected}, not the folder "
                              f"{Path(folder).name} it is in; it was moved or edited")


def _version() -> str:
    from localloss_pp import __version__
    return __version__


def read_manifest(folder: Path) -> dict:
    """The manifest of a checkpoint folder; CheckpointError if missing, foreign or damaged."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is damaged: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a localloss-pp checkpoint manifest")
    _check_manifest(folder, manifest)
    for name, digest in manifest["files"].items():
        try:
            data = (Path(folder) / name).read_bytes()
        except OSError:
            raise CheckpointError(f"checkpoint {folder} misses {name}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"checkpoint file {Path(folder) / name} is damaged "
                                  "(checksum mismatch)")
    return manifest


def _order(name: str) -> tuple:
    epoch, _, rest = name[1:].partition("-")
    return (int(epoch), 10 ** 9 if rest == "end" else int(rest[1:]))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    names = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("e")]
    return sorted(names, key=lambda p: _order(p.name))


def latest_checkpoint(run_dir: Path, log=None) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run that is complete and intact (damaged ones are skipped)."""
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return folder, read_manifest(folder)
        except CheckpointError as exc:
            if log is not None:
                log.warning("skipping checkpoint %s: %s", folder.name, exc)
    return None


def load_units(folder: Path, manifest: dict, wanted) -> tuple[dict, dict]:
    """(unit index -> saved unit dict, extra entries of the files read) for `wanted` units."""
    files = sorted({manifest["units"][str(i)] for i in wanted if str(i) in manifest["units"]})
    missing = [i for i in wanted if str(i) not in manifest["units"]]
    if missing:
        raise CheckpointError(f"checkpoint {folder} has no state for units {missing}")
    units, extra = {}, {}
    for name in files:
        try:
            payload = torch.load(Path(folder) / name, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{Path(folder) / name} cannot be read ({exc})") from None
        if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
            raise CheckpointError(f"{Path(folder) / name} is not a localloss-pp checkpoint file")
        for key, value in payload["units"].items():
            if int(key) in wanted:
                units[int(key)] = value
        for key in ("data", "global_stats"):
            if key in payload:
                extra[key] = payload[key]
    return units, extra


def prune_checkpoints(run_dir: Path, keep: int, epoch=None, step=None) -> None:
    """Delete all but the newest `keep` complete checkpoints (and older incomplete ones). A
    folder's manifest goes first, so that a folder half deleted is never taken for a
    checkpoint."""
    folders = list_checkpoints(run_dir)
    complete = [f for f in folders if (f / MANIFEST).exists()]
    if len(complete) <= keep:
        return
    cutoff = _order(complete[-keep].name)
    for folder in folders:
        if _order(folder.name) < cutoff:
            (folder / MANIFEST).unlink(missing_ok=True)
            fault_point("during-pruning", epoch, step)
            shutil.rmtree(folder, ignore_errors=True)
