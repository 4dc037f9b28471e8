"""Any image folder as a dataset: `--dataset folder:PATH` (docs/usage.md, "Your own data").

PATH/train/<class>/* are the training images, PATH/test/<class>/* (or PATH/val/<class>/*) the
test images; with train/ only, a fixed stratified share (--val-fraction) of every class is held
out as the test split, the same for every run and seed. Images of any size are resized
(shorter side) and centre-cropped to --image-size; grayscale or RGB is detected. A folder whose
decoded images fit in memory is decoded once into uint8 arrays (the in-memory batch path) and
cached with its per-channel statistics and a checksum of its file list (names, sizes, times of
change), beside the data or in the run directory: a changed folder is noticed and decoded
again. Larger folders stream through DataLoader workers.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from localloss_pp.config import IN_MEMORY_LIMIT_MB, DataConfig
from localloss_pp.data.registry import FOLDER_PREFIX, DatasetInfo, effective_info
from localloss_pp.data.transforms import ArraySplit, image_transforms
from localloss_pp.errors import first_line
from localloss_pp.seeds import derive_seed

__all__ = ["FolderScan", "scan_folder", "folder_splits", "FolderImages", "CACHE_FOLDER"]

log = logging.getLogger(__name__)

CACHE_FOLDER = ".localloss-pp-cache"
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
STATS_SAMPLE = 20000  # images the statistics of a streamed folder are measured on
_LAYOUT = ("put the images of each class in PATH/train/<class>/ (and the test images in "
           "PATH/test/<class>/ or PATH/val/<class>/)")


class FolderError(ValueError):
    """An image folder that cannot be a dataset as it is."""


@dataclass
class FolderScan:
    root: Path
    classes: list[str]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    test_from: str      # "test", "val" or "split" (held out of train/)
    mode: str           # "L" or "RGB"
    size: int
    listing: list[str]  # "split/relative path:size:mtime_ns" of every file
    fingerprint: str    # sha256 of the listing's names and sizes


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _class_files(split_dir: Path, where: str) -> dict[str, list[Path]]:
    """{class name: its files (recursive, sorted)} of one split folder."""
    classes = {}
    entries = sorted(p for p in split_dir.iterdir() if _visible(p))
    stray = [p for p in entries if not p.is_dir()]
    if stray:
        raise FolderError(f"{stray[0]} is not in a class folder: {where} must hold one folder "
                          "per class (and the images inside them); move it into its class folder")
    if not entries:
        raise FolderError(f"{split_dir} has no class folders; {_LAYOUT}")
    for class_dir in entries:
        files, seen = [], {os.path.realpath(class_dir)}
        for base, dirs, names in os.walk(class_dir, followlinks=True):
            # linked folders are followed, each real folder once (a link cycle ends here)
            dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")
                       and os.path.realpath(os.path.join(base, d)) not in seen]
            seen.update(os.path.realpath(os.path.join(base, d)) for d in dirs)
            files += [Path(base) / n for n in sorted(names) if not n.startswith(".")]
        if not files:
            raise FolderError(f"class folder {class_dir} is empty; put its images there or "
                              "remove the folder")
        classes[class_dir.name] = files
    return classes


def _held_out(files: list[Path], name: str, fraction: float) -> set[int]:
    """Indices of one class's files held out as test images: round(fraction * n), at least one
    when the class has two or more; drawn with a generator seeded by the class name only."""
    n = len(files)
    k = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
    gen = torch.Generator().manual_seed(derive_seed(0, 0, f"folder-split/{name}"))
    return set(torch.randperm(n, generator=gen)[:k].tolist())


def _probe(path: Path) -> tuple[str, tuple[int, int]]:
    """(mode, (width, height)) from the file's header; a FolderError if it is no image."""
    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except IMAGE_ERRORS as exc:
        raise FolderError(f"{path} is not an image that can be read ({first_line(exc)}); "
                          "remove it or move it out of the class folders") from None


def scan_folder(cfg: DataConfig, probe: bool = True) -> FolderScan:
    """The folder's classes and files, its checksum, and (`probe`: from every file's header)
    its mode and size; a FolderError naming the path and the fix for every way a folder cannot
    be a dataset."""
    text = cfg.dataset[len(FOLDER_PREFIX):]
    root = Path(text).expanduser()
    flag = f"--dataset {cfg.dataset}"
    if not root.exists():
        raise FolderError(f"{flag}: {root} does not exist; give the folder that holds train/")
    if not root.is_dir():
        raise FolderError(f"{flag}: {root} is a file, not a folder; give the folder that holds "
                          "train/")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise FolderError(f"{flag}: {root} has no train/ folder; {_LAYOUT.replace('PATH', text)}")
    train_classes = _class_files(train_dir, f"{train_dir}")
    classes = sorted(train_classes)
    index = {c: i for i, c in enumerate(classes)}
    test_from = "test" if (root / "test").is_dir() else "val" if (root / "val").is_dir() \
        else "split"
    train, test = [], []
    if test_from == "split":
        for c in classes:
            held = _held_out(train_classes[c], c, cfg.val_fraction)
            for i, f in enumerate(train_classes[c]):
                (test if i in held else train).append((f, index[c]))
    else:
        test_dir = root / test_from
        test_classes = _class_files(test_dir, f"{test_dir}")
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise FolderError(f"{test_dir} has class folder(s) {', '.join(extra)} that "
                              f"{train_dir} lacks: a class needs training images; add them to "
                              "train/ or remove the folder")
        train = [(f, index[c]) for c in classes for f in train_classes[c]]
        test = [(f, index[c]) for c in sorted(test_classes) for f in test_classes[c]]
    if not train or not test:
        raise FolderError(f"{flag}: {'no training' if not train else 'no test'} images remain "
                          f"(every class has a single image, so none is held out as a test "
                          f"image); add images, or give PATH/test/<class>/ folders")
    listing = []
    for split, items in (("train", train), ("test", test)):
        for f, _ in items:
            st = f.stat()
            listing.append(f"{split}/{f.relative_to(root).as_posix()}:{st.st_size}:"
                           f"{st.st_mtime_ns}")
    # the run's record of its data: names and sizes (a copy of the folder elsewhere, with new
    # times of change, is the same data); the cache also compares the times (listing)
    fingerprint = hashlib.sha256("\n".join(line.rsplit(":", 1)[0] for line in listing)
                                 .encode()).hexdigest()
    mode, size = _mode_and_size(cfg, train + test) if probe else ("", 0)
    return FolderScan(root, classes, train, test, test_from, mode, size, listing, fingerprint)


def _mode_and_size(cfg: DataConfig, items) -> tuple[str, int]:
    colour, sizes = None, {}
    for f, _ in items:
        mode, wh = _probe(f)
        if mode not in GRAY_MODES and colour is None:
            colour = (f, mode)
        sizes.setdefault(wh, f)
    if cfg.image_mode == "L" and colour is not None:
        raise FolderError(f"--image-mode L asks for grayscale images, but {colour[0]} is a "
                          f"colour image (mode {colour[1]}); drop --image-mode L (then colour "
                          "images make the dataset RGB) or convert the folder to grayscale")
    mode = cfg.image_mode if cfg.image_mode != "auto" else ("RGB" if colour else "L")
    if cfg.image_size:
        return mode, cfg.image_size
    (w, h), first = next(iter(sizes.items()))
    if len(sizes) > 1 or w != h:
        other = [f"{f} is {a}x{b}" for (a, b), f in list(sizes.items())[:2]]
        raise FolderError(f"the images are not all square and of one size ({'; '.join(other)}); "
                          "give --image-size N to resize (shorter side) and centre-crop them to "
                          "N x N")
    return mode, w


# what opening or decoding a damaged, foreign or oversized image file raises
IMAGE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def _in_mode(img: Image.Image, mode: str, path: Path) -> Image.Image:
    """`img` as 8-bit `mode` ("L" or "RGB"): 16-bit grayscale scaled to 8 bits (the top byte),
    never clipped; 32-bit integer or float images refused."""
    wide = np.asarray(img) if img.mode.startswith("I") else None
    if wide is not None and wide.size and (wide.min() < 0 or wide.max() > 65535):
        wide = None  # (a 32-bit image: refused below)
    if wide is not None:  # 16-bit (older Pillow opens 16-bit PNGs as mode I)
        img = Image.fromarray((wide.astype(np.uint32) >> 8).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        raise FolderError(f"{path} holds {'32-bit integer' if img.mode == 'I' else 'float'} "
                          f"pixels (mode {img.mode}), whose range is unknown; convert the "
                          "folder's images to 8- or 16-bit PNG or to JPEG")
    return img.convert(mode)


def _decode(path: Path, mode: str, size: int) -> np.ndarray:
    from torchvision.transforms import functional as TF
    try:
        with Image.open(path) as img:
            img = _in_mode(img, mode, path)
            if img.size != (size, size):
                img = TF.center_crop(TF.resize(img, size), size)
            return np.asarray(img, dtype=np.uint8)
    except FolderError:
        raise
    except IMAGE_ERRORS as exc:
        raise FolderError(f"{path} cannot be decoded ({first_line(exc)}); replace it with a "
                          "good copy or remove it") from None


def _decode_all(items, mode: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    channels = 1 if mode == "L" else 3
    out = np.empty((len(items), size, size, channels), dtype=np.uint8)
    for i, (f, _) in enumerate(items):
        out[i] = _decode(f, mode, size).reshape(size, size, channels)
    return (torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(),
            torch.tensor([c for _, c in items], dtype=torch.int64))


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), on the [0, 1] scale: exact, from
    each channel's histogram of its 256 values, counted a few images at a time (no float copy
    of the split)."""
    counts = torch.zeros(images.size(1), 256, dtype=torch.float64)
    for chunk in images.split(256):
        for c in range(images.size(1)):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1).to(torch.int64), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum(1)
    mean = (counts * values).sum(1) / n
    var = (counts * values ** 2).sum(1) / n - mean ** 2
    std = var.clamp(min=0).sqrt().clamp(min=1e-6)  # (a blank channel still normalises)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


class FolderImages(Dataset):
    """A streamed image folder split: (transformed image, label) per file."""

    def __init__(self, items: list[tuple[Path, int]], mode: str, transform):
        self.items, self.mode, self.transform = items, mode, transform
        self.targets = [c for _, c in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        try:
            with Image.open(path) as img:
                img = _in_mode(img, self.mode, path)
                return self.transform(img), label
        except FolderError:
            raise
        except IMAGE_ERRORS as exc:
            raise FolderError(f"{path} cannot be decoded ({first_line(exc)}); replace it with "
                              "a good copy or remove it") from None


def _cache_dir(root: Path, fallback) -> Path | None:
    """Beside the data where that folder is writable, else `fallback` (the run directory's)."""
    own = root / CACHE_FOLDER
    try:
        own.mkdir(exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=own):
            pass
        return own
    except OSError:
        pass
    if fallback is None:
        return None
    Path(fallback).mkdir(parents=True, exist_ok=True)
    return Path(fallback)


def _save(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _changes(old: list[str], new: list[str]) -> str:
    """'2 added, 1 removed, 3 changed' between two listings."""
    def names(listing):
        return {line.rsplit(":", 2)[0]: line for line in listing}
    a, b = names(old), names(new)
    added, removed = len(b.keys() - a.keys()), len(a.keys() - b.keys())
    changed = sum(1 for k in a.keys() & b.keys() if a[k] != b[k])
    return f"{added} added, {removed} removed, {changed} changed"


def _cached(path: Path | None, scan: FolderScan):
    """The cache's contents if it was made from this very file list; None otherwise."""
    if path is None or not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        log.warning("cache %s cannot be read (%s): decoding the folder again", path,
                    first_line(exc))
        return None
    if saved.get("listing") == scan.listing:
        return saved
    log.warning("image folder %s changed since its cache was made (files %s): decoding it "
                "again", scan.root, _changes(saved.get("listing", []), scan.listing))
    return None


def _check_norm(cfg: DataConfig, scan: FolderScan, channels: int) -> None:
    if cfg.mean and len(cfg.mean) != channels:
        raise FolderError(f"--mean/--std give {len(cfg.mean)} value(s), but the images of "
                          f"{scan.root} have {channels} channel(s) ({scan.mode}): give one per "
                          "channel")


def folder_splits(cfg: DataConfig, cache_dir=None):
    """(train split, test split, DatasetInfo) of `--dataset folder:PATH`. A cache made from
    this very file list gives the arrays (or the statistics) and the mode and size without
    opening a file; otherwise every file's header is read, then the images decoded."""
    scan = scan_folder(cfg, probe=False)
    where = _cache_dir(scan.root, cache_dir)
    split = f"split{cfg.val_fraction:g}" if scan.test_from == "split" else scan.test_from
    name = f"size{cfg.image_size or '-own'}-{cfg.image_mode}-{split}-{cfg.in_memory}.pt"
    cache = None if where is None else where / name
    saved = _cached(cache, scan)
    start = time.perf_counter()
    if saved is None:
        scan.mode, scan.size = _mode_and_size(cfg, scan.train + scan.test)
        channels = 1 if scan.mode == "L" else 3
        _check_norm(cfg, scan, channels)
        decoded_mb = (len(scan.train) + len(scan.test)) * channels * scan.size ** 2 / 2 ** 20
        in_memory = cfg.in_memory == "yes" or (cfg.in_memory == "auto" and
                                               decoded_mb <= IN_MEMORY_LIMIT_MB)
        saved = {"fingerprint": scan.fingerprint, "listing": scan.listing, "mode": scan.mode,
                 "size": scan.size}
        if in_memory:
            saved["train"] = _decode_all(scan.train, scan.mode, scan.size)
            saved["test"] = _decode_all(scan.test, scan.mode, scan.size)
            sample = saved["train"][0]
        else:
            gen = torch.Generator().manual_seed(derive_seed(0, 0, "folder-stats"))
            pick = torch.randperm(len(scan.train), generator=gen)[:STATS_SAMPLE].tolist()
            sample = _decode_all([scan.train[i] for i in sorted(pick)], scan.mode,
                                 scan.size)[0]
        saved["mean"], saved["std"] = _stats(sample)
        if cache is not None:
            _save(cache, saved)
        log.info("image folder %s: %d train / %d test images of %d classes decoded%s in %.1f s "
                 "(cache: %s)", scan.root, len(scan.train), len(scan.test), len(scan.classes),
                 " into memory" if in_memory else " for its statistics",
                 time.perf_counter() - start, cache or "none")
    scan.mode, scan.size = saved["mode"], saved["size"]
    in_memory = "train" in saved
    channels = 1 if scan.mode == "L" else 3
    info = DatasetInfo((channels, scan.size, scan.size), len(scan.classes),
                       tuple(saved["mean"]), tuple(saved["std"]), "resized_crop_flip",
                       in_memory=in_memory, classes=tuple(scan.classes),
                       fingerprint=scan.fingerprint)
    _check_norm(cfg, scan, channels)
    info = effective_info(info, cfg)
    if in_memory:
        return ArraySplit(*saved["train"]), ArraySplit(*saved["test"]), info
    return (FolderImages(scan.train, scan.mode, image_transforms(info, cfg, True, resize=True)),
            FolderImages(scan.test, scan.mode, image_transforms(info, cfg, False, resize=True)),
            info)
