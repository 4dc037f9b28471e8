"""Small image folders made with PIL for the tests of `--dataset folder:PATH`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("bottom", "middle", "top")


def make_folder(root: Path, per_class: int = 12, test_per_class: int = 4, size=(12, 12),
                mode: str = "RGB", classes=CLASSES) -> Path:
    """root/train/<class>/*.png (and root/test/<class>/*.png unless test_per_class is 0): noisy
    images with a bright band whose row is the class, so that a tiny model learns them."""
    rng = np.random.default_rng(0)
    w, h = size
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            if n == 0:
                continue
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (h, w, 3) if mode == "RGB" else (h, w)
                a = rng.integers(0, 70, shape).astype(np.uint8)
                row = (h * (2 * c + 1)) // (2 * len(classes))
                a[max(0, row - 1):row + 2] = 220
                Image.fromarray(a, mode=mode).save(folder / f"{i:03d}.png")
    return root
