"""Your own data, two ways: a folder of images, and a dataset registered in code.

1. A folder tree PATH/train/<class>/*.png (and PATH/test/<class>/*) trains with
   `--dataset folder:PATH` (or `dataset="folder:PATH"` from Python): no code at all.
2. A dataset made in code is registered with `register_dataset`; this module registers
   `blobs`, so any run can use it:

       localloss-pp train --dataset-module examples.own_data --dataset blobs --model mlp

Run from the repository root: `python examples/own_data.py [WORK_DIR]` writes a small folder
of PNG images into WORK_DIR (default: runs/own-data), trains on it and on `blobs` (each a few
seconds on a CPU), loads the trained model and classifies an image file with it.
"""
import sys
from pathlib import Path

import numpy as np

from localloss_pp.data import DatasetInfo, register_dataset

CLASSES = ("top-left", "centre", "bottom-right")


@register_dataset("blobs", info=DatasetInfo(input_shape=(1, 16, 16), num_classes=3,
                                            mean=(0.3,), std=(0.3,), augment="flip"))
def blobs(cfg, train, transform):
    """One split of `blobs`: noisy 16x16 grayscale images with a bright square at the top left,
    the centre or the bottom right (the class). In memory: uint8 images (N, H, W) and labels."""
    rng = np.random.default_rng(0 if train else 1)
    n = 600 if train else 150
    labels = rng.integers(0, 3, n)
    images = rng.integers(0, 80, (n, 16, 16)).astype(np.uint8)
    for image, c in zip(images, labels):
        o = 2 + 4 * int(c)
        image[o:o + 4, o:o + 4] = 230
    return images, labels


def make_folder(root: Path) -> Path:
    """A small image folder: RGB PNGs of 20x24 pixels (resized and cropped to --image-size),
    a coloured square whose place is the class; train/ and test/ per class."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, (20, 24, 3)).astype(np.uint8)
                o = 2 + 6 * c
                img[o:o + 6, o + 2:o + 8] = (240, 200, 40)
                Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def main(work: Path) -> None:
    from PIL import Image
    from torchvision.transforms import functional as TF

    import localloss_pp as lp

    folder = make_folder(work / "shapes")
    # 1. an image folder: 16x16 inputs, flips only (the default random resized crop would
    # often cut the square away in images this small)
    result = lp.train(dataset=f"folder:{folder}", image_size=16, augment="flip", model="mlp",
                      num_layers=1, num_hidden=64, epochs=3, batch_size=32,
                      run_dir=str(work / "run-folder"), progress=False, print_stats=False)
    print(f"image folder: test error {result.test_error:.2f}% after {result.epochs} epochs")
    model = lp.load(result.run_dir)
    evaluation = lp.evaluate(model)
    print("accuracy per class:", {k: f"{v:.0f}%" for k, v in
                                  evaluation.per_class_accuracy.items()})
    # classify an image file as the run saw it: resized (shorter side), centre-cropped
    with Image.open(folder / "test" / "centre" / "000.png") as img:
        img = TF.center_crop(TF.resize(img.convert("RGB"), 16), 16)
    pixels = TF.pil_to_tensor(img).unsqueeze(0)  # uint8 (1, 3, 16, 16)
    print("test/centre/000.png is", model.classes[int(model.predict(pixels))])

    # 2. the registered dataset, by its name (the module that registers it is imported first)
    result = lp.train(dataset="blobs", dataset_module="examples.own_data", model="mlp",
                      num_layers=1, num_hidden=64, epochs=2, batch_size=50,
                      run_dir=str(work / "run-blobs"), progress=False, print_stats=False)
    print(f"blobs: test error {result.test_error:.2f}%")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/own-data"))
