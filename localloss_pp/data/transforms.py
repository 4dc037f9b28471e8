"""The per-image transforms of datasets read image by image (torchvision's, plus cutout) and
the in-memory split type."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from localloss_pp.config import DataConfig
from localloss_pp.data.registry import DatasetInfo

__all__ = ["Cutout", "image_transforms", "ArraySplit"]


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


def image_transforms(info: DatasetInfo, cfg: DataConfig, train: bool, resize: bool = False):
    """The torchvision transforms of one split of a dataset read image by image (the streamed
    path; also what the in-memory datasets' items give). `resize`: images of any size are
    resized (shorter side) and centre-cropped to the info's size (image folders)."""
    from torchvision import transforms as T
    size = info.input_shape[1]
    tail = [T.ToTensor(), T.Normalize(info.mean, info.std)]
    fit = [T.Resize(size), T.CenterCrop(size)] if resize else []
    if info.augment == "imagenet":
        head = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()] if train else \
            [T.Resize(256), T.CenterCrop(224)]
    elif not train or info.augment == "none":
        head = fit
    elif info.resized_crop:
        head = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        head = fit + ([T.RandomCrop(size, padding=info.crop_padding)] if info.crop_padding
                      else []) + ([T.RandomHorizontalFlip()] if info.flips else [])
    if train and cfg.cutout:
        tail.append(Cutout(cfg.n_holes, cfg.length))
    return T.Compose(head + tail)


class ArraySplit(Dataset):
    """One in-memory split: uint8 `data` (N, C, H, W; given as such, or N x H x W, or
    N x H x W x C) and integer `targets` (N,)."""

    def __init__(self, data, targets, transform=None):
        data = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data))
        if data.dim() == 3:  # N x H x W: one channel
            data = data.unsqueeze(1)
        elif data.dim() == 4 and data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):
            data = data.permute(0, 3, 1, 2)  # N x H x W x C
        self.data = data.contiguous()
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        img = self.data[i]
        if self.transform is None:
            return img, int(self.targets[i])
        img = Image.fromarray(img.permute(1, 2, 0).squeeze(2).numpy())
        return self.transform(img), int(self.targets[i])
