"""The dataset registry: `--dataset NAME` -> entry; `folder:PATH` for any image folder tree;
`--dataset-module` and entry points for a user's own (docs/usage.md, "Your own data").

An entry knows its `DatasetInfo` (splits' input shape, classes, normalisation, augmentation,
in memory or streamed) and how to open its two splits. This module imports no torch: the
command line's help and the launch-time check of a name read it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from localloss_pp.config import DataConfig

__all__ = ["DatasetInfo", "DatasetEntry", "register_dataset", "dataset_entry",
           "registered_datasets", "resolve_dataset", "dataset_info", "load_dataset_module",
           "dataset_slug", "BUILTIN_DATASETS", "ENTRY_POINT_GROUP", "AUGMENTS", "FOLDER_PREFIX"]

ENTRY_POINT_GROUP = "localloss_pp.datasets"
FOLDER_PREFIX = "folder:"
# --augment: "auto" keeps the dataset's own; the others replace it (internal names)
AUGMENTS = {"none": "none", "flip": "flip", "crop-flip": "crop_flip",
            "resized-crop-flip": "resized_crop_flip"}


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the batches need to know of a dataset.

    `augment`: the training augmentation: "none", "flip", "jitter" (random crop, padding 2),
    "jitter_flip", "crop4_flip" (padding 4, then a flip), "crop_flip" (padding size/8, then a
    flip), "resized_crop_flip" (a random resized crop, then a flip) or "imagenet" (the
    reference's ImageNet transforms). `in_memory`: the splits are uint8 arrays kept on the
    first stage's device (else DataLoader workers decode them). `classes`: the class names
    (index order) where known; `fingerprint`: a checksum of an image folder's file list."""
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    in_memory: bool = True
    classes: tuple[str, ...] = ()
    fingerprint: str = ""

    @property
    def crop_padding(self) -> int:
        if self.augment == "crop_flip":
            return max(1, self.input_shape[1] // 8)
        return {"jitter": 2, "jitter_flip": 2, "crop4_flip": 4}.get(self.augment, 0)

    @property
    def flips(self) -> bool:
        return self.augment in ("jitter_flip", "crop4_flip", "crop_flip", "flip",
                                "resized_crop_flip")

    @property
    def resized_crop(self) -> bool:
        return self.augment == "resized_crop_flip"

    def to_dict(self) -> dict:
        """Plain values (lists, floats, strings): for JSON files and model.pt."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in d.items() if k in known})


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: `kind` "builtin" (read by data/datasets.py), "folder" (an image
    folder, data/folder.py) or "user" (`loader`, given to register_dataset)."""
    name: str
    kind: str
    info: DatasetInfo | None = None  # None: known only once the data is read (image folders)
    loader: Callable | None = None


_REGISTRY: dict[str, DatasetEntry] = {}
AUGMENT_KINDS = ("none", "flip", "jitter", "jitter_flip", "crop4_flip", "crop_flip",
                 "resized_crop_flip")


def _check_info(name: str, info: DatasetInfo) -> None:
    """A registered dataset's info makes sense (a ValueError naming the field otherwise)."""
    where = f"register_dataset({name!r}): DatasetInfo"
    shape = info.input_shape
    if len(shape) != 3 or not all(isinstance(v, int) and v >= 1 for v in shape):
        raise ValueError(f"{where}.input_shape must be (channels, height, width), positive "
                         f"integers, got {shape!r}")
    if not isinstance(info.num_classes, int) or info.num_classes < 1:
        raise ValueError(f"{where}.num_classes must be an integer >= 1, got {info.num_classes!r}")
    if len(info.mean) != shape[0] or len(info.std) != shape[0]:
        raise ValueError(f"{where}: mean and std need one value per channel ({shape[0]}), got "
                         f"{len(info.mean)} and {len(info.std)}")
    if not all(s > 0 for s in info.std):
        raise ValueError(f"{where}.std values must be > 0, got {info.std}")
    if info.augment not in AUGMENT_KINDS:
        raise ValueError(f"{where}.augment {info.augment!r} is not one of "
                         f"{', '.join(AUGMENT_KINDS)}")


def register_dataset(name: str, loader: Callable | None = None, *, info: DatasetInfo):
    """Register `loader` for `--dataset name`; usable as a decorator.

    `loader(data_cfg, train, transform)` returns one split: for `info.in_memory` (the default)
    a pair (uint8 images (N, C, H, W) or (N, H, W), integer labels (N,)) as tensors or NumPy
    arrays, or an object with such `data` and `targets`; otherwise a torch Dataset whose items
    are (image, label) with `transform` applied to the image (torchvision transforms made from
    `info`: resize, crop, flip, to tensor, normalise). Labels are 0 .. num_classes - 1."""
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"register_dataset({name!r}): info must be a DatasetInfo")
    _check_info(name, info)

    def add(fn: Callable) -> Callable:
        _REGISTRY[name.lower()] = DatasetEntry(name, "user", info, fn)
        return fn
    return add if loader is None else add(loader)


BUILTIN_DATASETS: dict[str, DatasetInfo] = {
    "mnist5k": DatasetInfo((1, 28, 28), 10, (0.1307,), (0.3081,), "jitter"),
    "MNIST": DatasetInfo((1, 28, 28), 10, (0.1307,), (0.3081,), "jitter"),
    "FashionMNIST": DatasetInfo((1, 28, 28), 10, (0.286,), (0.353,), "jitter_flip"),
    "KuzushijiMNIST": DatasetInfo((1, 28, 28), 10, (0.1904,), (0.3475,), "none"),
    "CIFAR10": DatasetInfo((3, 32, 32), 10, (0.424, 0.415, 0.384), (0.283, 0.278, 0.284),
                           "crop4_flip"),
    "CIFAR100": DatasetInfo((3, 32, 32), 100, (0.438, 0.418, 0.377), (0.300, 0.287, 0.294),
                            "crop4_flip"),
    "SVHN": DatasetInfo((3, 32, 32), 10, (0.431, 0.430, 0.446), (0.197, 0.198, 0.199), "none"),
    "STL10": DatasetInfo((3, 96, 96), 10, (0.447, 0.440, 0.407), (0.260, 0.257, 0.271), "none"),
    "ImageNet": DatasetInfo((3, 224, 224), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                            "imagenet", in_memory=False),
}
_REGISTRY.update({name.lower(): DatasetEntry(name, "builtin", info)
                  for name, info in BUILTIN_DATASETS.items()})


def effective_info(info: DatasetInfo, cfg: DataConfig) -> DatasetInfo:
    """`info` with what the config overrides: --augment, --mean/--std."""
    changes = {}
    if cfg.augment != "auto":
        changes["augment"] = AUGMENTS[cfg.augment]
    if cfg.mean:
        changes["mean"], changes["std"] = tuple(cfg.mean), tuple(cfg.std)
    return dataclasses.replace(info, **changes) if changes else info


def load_dataset_module(path: str) -> None:
    """Import a user's module that registers datasets (--dataset-module)."""
    from localloss_pp.plugins import import_user_module
    import_user_module(path, "--dataset-module", "a dataset module",
                       "only define and register datasets", "examples.own_data")


def dataset_entry(name: str) -> DatasetEntry | None:
    """The entry of `name` (a folder:PATH, or a registered name; installed packages' entry
    points included); None if there is none."""
    if name.startswith(FOLDER_PREFIX):
        return DatasetEntry(name, "folder")
    key = name.lower()
    if key not in _REGISTRY:
        from localloss_pp.plugins import load_entry_points
        load_entry_points(ENTRY_POINT_GROUP, "dataset")
    return _REGISTRY.get(key)


def registered_datasets() -> list[str]:
    """The registered names (built-in first, in their order; then a user's)."""
    return [e.name for e in _REGISTRY.values()]


def resolve_dataset(d: DataConfig) -> DatasetEntry:
    """Check `--dataset` (after importing --dataset-module) and canonicalise the name; a
    ValueError naming the choices. Idempotent."""
    if d.module:
        load_dataset_module(d.module)
    entry = dataset_entry(d.dataset)
    if entry is None:
        raise ValueError(f"unknown dataset {d.dataset!r} (--dataset); choose one of: "
                         f"{', '.join(registered_datasets())}; or folder:PATH for a folder of "
                         "your own images (PATH/train/<class>/*); or register your own and name "
                         "its module with --dataset-module (docs/usage.md, \"Your own data\")")
    if entry.info is not None:
        d.dataset = entry.name
        folder_only = [flag for flag, on in (
            ("--image-size", d.image_size), ("--image-mode", d.image_mode != "auto"),
            ("--val-fraction", d.val_fraction != DataConfig.val_fraction),
            ("--in-memory", d.in_memory != "auto")) if on]
        if folder_only:
            raise ValueError(f"{folder_only[0]} applies to image folders (--dataset "
                             f"folder:PATH); {entry.name} has its own: drop it")
        if d.augment != "auto" and entry.info.augment == "imagenet":
            raise ValueError(f"--augment {d.augment}: {entry.name} keeps the reference's "
                             "ImageNet transforms (random resized crops of 224, flips); drop "
                             "--augment")
        if d.mean and len(d.mean) != entry.info.input_shape[0]:
            raise ValueError(f"--mean/--std give {len(d.mean)} value(s), but {entry.name} has "
                             f"{entry.info.input_shape[0]} channel(s): give one per channel")
    return entry


def dataset_info(d: DataConfig) -> DatasetInfo | None:
    """The info of the configured dataset when it is known without reading the data (every
    registered one); None for an image folder (its classes and statistics are read)."""
    entry = resolve_dataset(d)
    return None if entry.info is None else effective_info(entry.info, d)


def dataset_slug(name: str) -> str:
    """A dataset name fit for a folder name: folder:/data/my-pets -> folder-my-pets."""
    if name.startswith(FOLDER_PREFIX):
        tail = name[len(FOLDER_PREFIX):].rstrip("/\\").replace("\\", "/").split("/")[-1]
        return "folder-" + ("".join(c if c.isalnum() or c in "-_." else "_" for c in tail)
                            or "data")
    return name
