"""The first stage's batches: index order, batched augmentation on the device, sources.

Two kinds of source produce the same thing, `(x, y, y_host)` per batch (input on the stage's
device, labels on the device and on the host for the next message's header):

- `TensorBatches` for the datasets that fit in memory (mnist5k, MNIST, FashionMNIST,
  KuzushijiMNIST, CIFAR-10/100, SVHN, STL10): the whole split is one uint8 tensor on the first
  stage's device and every batch is made with a few batched tensor operations (index, random
  crop with zero padding, horizontal flip, conversion and normalisation, cutout). No PIL, no
  per-image Python, no worker processes, no host-to-device copy per batch (the epoch's index
  order is copied once per epoch).
- `LoaderBatches` for image folders (ImageNet): a DataLoader with worker processes that decode
  and augment with torchvision, pinned memory and asynchronous copies to the device.

Randomness: the augmentation of batch `seq` of epoch `e` on replica `r` is drawn from one
generator seeded from (seed, e, r, seq) (per sample for image folders), so it depends neither on
the stage count nor on the number of workers, and a run resumed mid-epoch draws exactly what an
uninterrupted run draws, without any saved generator state.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from localloss_pp.seeds import augment_seed, derive_seed
from localloss_pp.config import DataConfig
from localloss_pp.layout import shard_bounds

__all__ = ["BatchAugment", "NClassRandomSampler", "EpochBatches", "ShardedBatches",
           "TensorBatches", "LoaderBatches", "normalize"]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float32, the operations of torchvision's ToTensor (divide by
    255) then Normalize (subtract the mean, divide by the std), in that order, so the values are
    the same bits."""
    return x.to(torch.float32).div(255).sub(mean).div(std)


class BatchAugment:
    """The reference's training transforms applied to a whole uint8 batch at once.

    `pad`: RandomCrop(size, padding=pad): zero padding in pixel space, then one crop offset per
    image, uniform over [0, 2*pad]^2 (a shift in [-pad, pad]^2). `flip`: RandomHorizontalFlip
    (p = 0.5). Then ToTensor + Normalize, then `cutout` = (n_holes, length) after normalisation:
    per image and hole a centre uniform over the image and a square of side `length` clipped at
    the border, zero in all channels. `resized_crop` (image folders): first a random resized
    crop (see `resize_crop`)."""

    def __init__(self, *, pad: int, flip: bool, mean, std, cutout: tuple[int, int] | None,
                 device: torch.device, resized_crop: bool = False):
        self.pad, self.flip, self.cutout = pad, flip, cutout
        self.resized_crop = resized_crop
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)

    @property
    def random(self) -> bool:
        return bool(self.pad or self.flip or self.cutout or self.resized_crop)

    def resize_crop(self, x: torch.Tensor, gen: torch.Generator,
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
        """torchvision's RandomResizedCrop on a whole batch, in one bilinear resampling: per
        image an area fraction uniform over `scale` and a log-uniform aspect ratio over
        `ratio`; a box that does not fit is clipped to the image (torchvision redraws it up to
        10 times instead); a position uniform over where the box fits. Returns float values
        on the uint8 scale."""
        b, _, h, w = x.shape
        dev = x.device
        area = torch.empty(b, device=dev).uniform_(*scale, generator=gen)
        log_r = torch.empty(b, device=dev).uniform_(
            float(np.log(ratio[0])), float(np.log(ratio[1])), generator=gen)
        aspect = log_r.exp()
        cw = (area * aspect).sqrt().clamp(max=1.0)  # box width / image width
        ch = (area / aspect).sqrt().clamp(max=1.0)
        left = torch.rand(b, generator=gen, device=dev) * (1 - cw)
        top = torch.rand(b, generator=gen, device=dev) * (1 - ch)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = cw, 2 * left + cw - 1
        theta[:, 1, 1], theta[:, 1, 2] = ch, 2 * top + ch - 1
        grid = F.affine_grid(theta, [b, x.size(1), h, w], align_corners=False)
        return F.grid_sample(x.to(torch.float32), grid, mode="bilinear",
                             padding_mode="border", align_corners=False)

    def crop(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, c, h, w = x.shape
        p, dev = self.pad, x.device
        padded = F.pad(x, (p, p, p, p))
        top = torch.randint(0, 2 * p + 1, (b, 1), generator=gen, device=dev)
        left = torch.randint(0, 2 * p + 1, (b, 1), generator=gen, device=dev)
        rows = top + torch.arange(h, device=dev)  # (B, H)
        cols = left + torch.arange(w, device=dev)  # (B, W)
        ib = torch.arange(b, device=dev).view(b, 1, 1, 1)
        ic = torch.arange(c, device=dev).view(1, c, 1, 1)
        return padded[ib, ic, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]

    def hflip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        flip = torch.rand(x.size(0), generator=gen, device=x.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def cut(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n_holes, length = self.cutout
        b, _, h, w = x.shape
        dev, half = x.device, length // 2
        cy = torch.randint(0, h, (b, n_holes, 1), generator=gen, device=dev)
        cx = torch.randint(0, w, (b, n_holes, 1), generator=gen, device=dev)
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        in_rows = (ys >= cy - half) & (ys < cy + half)  # (B, holes, H)
        in_cols = (xs >= cx - half) & (xs < cx + half)  # (B, holes, W)
        hole = (in_rows.unsqueeze(3) & in_cols.unsqueeze(2)).any(1)  # (B, H, W)
        return x * (~hole).unsqueeze(1).to(x.dtype)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.resized_crop:
            x = self.resize_crop(x, gen)
        if self.pad:
            x = self.crop(x, gen)
        if self.flip:
            x = self.hflip(x, gen)
        x = normalize(x, self.mean, self.std)
        if self.cutout:
            x = self.cut(x, gen)
        return x


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


class EpochBatches(Sampler[list[int]]):
    """Batches of one epoch: an index order that is a function of (seed, epoch) only, cut into
    batches of `batch_size` (the last one may be short), optionally skipping the first ones;
    with replicas, this replica's share of every batch.

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

    def order(self) -> torch.Tensor:
        """The epoch's index order (int64, on the CPU)."""
        if self.class_sampler_active():
            sampler = NClassRandomSampler(self.labels, self.cfg.classes_per_batch,
                                          self.cfg.batch_size, self.seed)
            sampler.set_epoch(self.epoch)
            return torch.tensor(list(sampler), dtype=torch.int64)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, "shuffle"))
        return torch.randperm(len(self.labels), generator=gen)

    def spans(self):
        """(seq, start, stop) of this replica's part of every remaining batch in `order()`."""
        bs, n = self.cfg.batch_size, len(self.labels)
        for seq, start in enumerate(range(self.skip * bs, n, bs), start=self.skip):
            size = min(bs, n - start)
            lo, hi = shard_bounds(size, self.replica, self.num_replicas)
            yield seq, start + lo, start + hi

    def __len__(self) -> int:
        return max(0, -(-len(self.labels) // self.cfg.batch_size) - self.skip)

    def __iter__(self):
        order = self.order().tolist()
        for _, a, b in self.spans():
            yield order[a:b]


class ShardedBatches(Sampler[list[int]]):
    """The test set in order, cut into batches of `batch_size`; each replica takes its share
    of every batch (all of it with one replica)."""

    def __init__(self, num_examples: int, batch_size: int, replica: int = 0,
                 num_replicas: int = 1):
        self.n, self.bs = num_examples, batch_size
        self.replica, self.num_replicas = replica, num_replicas

    def __len__(self) -> int:
        return -(-self.n // self.bs)

    def spans(self):
        for seq, start in enumerate(range(0, self.n, self.bs)):
            stop = min(start + self.bs, self.n)
            lo, hi = shard_bounds(stop - start, self.replica, self.num_replicas)
            yield seq, start + lo, start + hi

    def __iter__(self):
        for _, a, b in self.spans():
            yield list(range(a, b))


class _Source:
    """What the stage loop iterates: `set_epoch`, `len()`, and (x, y, y_host) batches."""

    def __init__(self, batches, num_examples: int, device: torch.device):
        self.batches, self.num_examples, self.device = batches, num_examples, device
        self.epoch = 1

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        if isinstance(self.batches, EpochBatches):
            self.batches.set_epoch(epoch, skip)

    def class_sampler_active(self) -> bool:
        return isinstance(self.batches, EpochBatches) and self.batches.class_sampler_active()

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Release what the source holds beyond memory (worker processes); nothing here."""


class TensorBatches(_Source):
    """An in-memory split on the device, served as batches made with tensor operations.

    `images`: uint8 (N, C, H, W); `labels`: int64 (N,). Training splits (`batches` an
    EpochBatches) are augmented with `augment`; test splits are normalised only."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batches, augment: BatchAugment,
                 *, device: torch.device, seed: int, replica: int = 0, train: bool = True):
        super().__init__(batches, len(labels), device)
        self.images = images.to(device)
        self.labels_host = labels.to(torch.int64).contiguous()
        self.labels = self.labels_host.to(device)
        self.augment, self.seed, self.replica, self.train = augment, seed, replica, train
        self.gen = torch.Generator(device=device) if train and augment.random else None

    def _device_copy(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the device; from pinned memory, asynchronously, on CUDA."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def __iter__(self):
        if not self.train:  # the test set in order: contiguous slices, no index
            for _, a, b in self.batches.spans():
                x = normalize(self.images[a:b], self.augment.mean, self.augment.std)
                yield x, self.labels[a:b], self.labels_host[a:b]
            return
        order = self.batches.order()
        order_dev = self._device_copy(order)  # once per epoch
        for seq, a, b in self.batches.spans():
            idx = order_dev[a:b]
            if self.gen is not None:
                self.gen.manual_seed(augment_seed(self.seed, self.epoch, self.replica, seq))
            x = self.augment(self.images[idx], self.gen)
            yield x, self.labels[idx], self.labels_host[order[a:b]]


class _SeededItems(Dataset):
    """A dataset whose items are addressed by (seed, index): the transform's randomness (torch's
    global generator, which torchvision's transforms use) is seeded per sample, so the result
    does not depend on which worker process loads it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        seed, index = key
        with torch.random.fork_rng(devices=[]):  # the CPU generator, restored afterwards
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]


class _SeededBatchSampler(Sampler):
    def __init__(self, source: "LoaderBatches"):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.batches)

    def __iter__(self):
        src = self.source
        order = None
        if isinstance(src.batches, EpochBatches):
            order = src.batches.order().tolist()
        for seq, a, b in src.batches.spans():
            base = augment_seed(src.seed, src.epoch, src.replica, seq)
            idx = order[a:b] if order is not None else range(a, b)
            yield [((base + j) & ((1 << 63) - 1), i) for j, i in enumerate(idx)]


def _worker_error(exc: Exception) -> Exception:
    """A DataLoader worker's exception re-raised with the worker's own message first (the
    loader's copy starts "Caught X in DataLoader worker process N." and ends with the original
    "module.X: message" line)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return exc
    last = text.strip().splitlines()[-1]
    message = last.split(": ", 1)[1] if ": " in last else last
    try:
        return type(exc)(message)
    except Exception:
        return RuntimeError(message)


class LoaderBatches(_Source):
    """A dataset decoded and augmented by DataLoader workers (image folders such as ImageNet):
    pinned batches, prefetched by the workers, copied to the device asynchronously."""

    def __init__(self, dataset, batches, *, device: torch.device, seed: int, replica: int = 0,
                 num_workers: int = 0):
        super().__init__(batches, len(dataset), device)
        self.seed, self.replica = seed, replica
        cuda = device.type == "cuda"
        self.loader = DataLoader(_SeededItems(dataset), batch_sampler=_SeededBatchSampler(self),
                                 num_workers=num_workers, pin_memory=cuda,
                                 persistent_workers=num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                x, y_host = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # a worker's error: keep its own message as the first line
                err = _worker_error(exc)
                if err is exc:
                    raise
                raise err from exc
            yield (x.to(self.device, non_blocking=True), y_host.to(self.device, non_blocking=True),
                   y_host)

    def close(self) -> None:
        """Stop the persistent workers now. The loader's batch sampler refers back to this
        source, so without close() only the cyclic garbage collector frees them, at a moment of
        its choosing and in an order that leaves each worker waiting out its 5 s poll."""
        self.loader = None  # the last reference: the loader's iterator shuts its workers down
