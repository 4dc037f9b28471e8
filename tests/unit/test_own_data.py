"""Datasets as a registry and any image folder as a dataset (`--dataset folder:PATH`):
classes, splits, sizes, modes, statistics, the cache and its checksum, the streamed path, the
batched random resized crop, a user's registered loader, and every bad folder's one line."""
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imagefolders import CLASSES, make_folder
from localloss_pp.cli import main
from localloss_pp.config import DataConfig
from localloss_pp.data.batches import BatchAugment
from localloss_pp.data.datasets import build_datasets, build_sources
from localloss_pp.data.folder import CACHE_FOLDER, FolderError, scan_folder
from localloss_pp.data.registry import DatasetInfo, register_dataset, resolve_dataset

CPU = torch.device("cpu")


def folder_cfg(path, **kw) -> DataConfig:
    return DataConfig(dataset=f"folder:{path}", **kw)


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "pets")


def test_an_image_folder_is_decoded_once_into_memory_with_its_classes_and_statistics(folder):
    train, test, info = build_datasets(folder_cfg(folder))
    assert info.classes == CLASSES and info.num_classes == 3
    assert info.input_shape == (3, 12, 12) and info.in_memory
    assert info.augment == "resized_crop_flip"
    assert train.data.shape == (36, 3, 12, 12) and train.data.dtype == torch.uint8
    assert len(test.targets) == 12
    # classes are numbered in sorted folder order, files in name order within a class
    first_middle = np.array(Image.open(folder / "train" / "middle" / "000.png"))
    assert torch.equal(train.data[12], torch.from_numpy(first_middle).permute(2, 0, 1))
    assert list(train.targets[:13]) == [0] * 12 + [1]
    # the normalisation is measured on the training split
    x = train.data.to(torch.float64) / 255
    assert info.mean == pytest.approx(x.mean((0, 2, 3)).tolist(), abs=1e-5)
    assert info.std == pytest.approx(x.transpose(0, 1).reshape(3, -1).std(1, unbiased=False)
                                     .tolist(), abs=1e-5)
    cached = list((folder / CACHE_FOLDER).glob("*.pt"))
    assert len(cached) == 1
    again_train, _, again = build_datasets(folder_cfg(folder))  # from the cache
    assert again == info and torch.equal(again_train.data, train.data)


def rebuilt(folder, caplog):
    """(train split, info) of `folder` read again, with the package's log lines captured."""
    logger = logging.getLogger("localloss_pp")
    logger.addHandler(caplog.handler)
    try:
        train, _, info = build_datasets(folder_cfg(folder))
    finally:
        logger.removeHandler(caplog.handler)
    return train, info


def test_a_changed_folder_is_noticed_and_decoded_again(folder, caplog):
    _, _, before = build_datasets(folder_cfg(folder))
    shutil.copy(folder / "train" / "top" / "000.png", folder / "train" / "top" / "new.png")
    train, after = rebuilt(folder, caplog)
    assert after.fingerprint != before.fingerprint and len(train.targets) == 37
    assert "changed since its cache was made (files 1 added, 0 removed, 0 changed)" \
        in caplog.text


def test_without_a_test_folder_a_fixed_share_of_every_class_is_held_out(tmp_path):
    root = make_folder(tmp_path / "f", per_class=10, test_per_class=0)
    scan = scan_folder(folder_cfg(root))
    assert scan.test_from == "split" and len(scan.test) == 3 and len(scan.train) == 27
    assert sorted(c for _, c in scan.test) == [0, 1, 2]  # stratified
    assert scan_folder(folder_cfg(root)).test == scan.test  # a fixed draw, no run seed in it
    wider = scan_folder(folder_cfg(root, val_fraction=0.3))
    assert len(wider.test) == 9 and set(scan.test) <= set(wider.test) | set(scan.test)


def test_images_of_any_size_are_resized_and_cropped_and_grayscale_is_detected(tmp_path):
    root = make_folder(tmp_path / "f", size=(20, 14), mode="L")
    with pytest.raises(FolderError, match="not all square and of one size.*--image-size N"):
        build_datasets(folder_cfg(root))
    train, test, info = build_datasets(folder_cfg(root, image_size=8))
    assert info.input_shape == (1, 8, 8) and train.data.shape[1:] == (1, 8, 8)
    _, _, rgb = build_datasets(folder_cfg(root, image_size=8, image_mode="RGB"))
    assert rgb.input_shape == (3, 8, 8)


def test_a_streamed_folder_gives_the_in_memory_test_images(folder):
    _, test_mem, info_mem = build_datasets(folder_cfg(folder))
    train, test, info = build_datasets(folder_cfg(folder, in_memory="no"))
    assert not info.in_memory and info.mean == info_mem.mean and info.std == info_mem.std
    x, y = test[5]
    mean = torch.tensor(info.mean).view(3, 1, 1)
    std = torch.tensor(info.std).view(3, 1, 1)
    assert torch.allclose(x, (test_mem.data[5].float() / 255 - mean) / std, atol=1e-6)
    assert y == int(test_mem.targets[5])
    src = build_sources(folder_cfg(folder, in_memory="no", batch_size=8), 1, CPU)[0]
    xb, yb, _ = next(iter(src))
    assert xb.shape == (8, 3, 12, 12) and yb.shape == (8,)
    src.close()


def test_batches_of_random_resized_crops_are_drawn_from_the_run_seed(folder):
    cfg = folder_cfg(folder, batch_size=8)
    a = next(iter(build_sources(cfg, 1, CPU)[0]))[0]
    b = next(iter(build_sources(cfg, 1, CPU)[0]))[0]
    c = next(iter(build_sources(cfg, 2, CPU)[0]))[0]
    assert a.shape == (8, 3, 12, 12) and torch.equal(a, b) and not torch.equal(a, c)
    # the whole image at ratio 1 is the identity: the box arithmetic is exact
    aug = BatchAugment(pad=0, flip=False, mean=(0.0,), std=(1.0,), cutout=None, device=CPU,
                       resized_crop=True)
    x = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    out = aug.resize_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(out, x.float(), atol=1e-3)


def test_a_registered_dataset_is_read_from_its_loader_and_checked():
    info = DatasetInfo((1, 8, 8), 2, (0.5,), (0.25,), "flip")

    @register_dataset("Test-Blobs", info=info)
    def blobs(cfg, train, transform):
        n = 10 if train else 4
        return np.full((n, 8, 8), 7, dtype=np.uint8), np.arange(n) % 2

    cfg = DataConfig(dataset="test-blobs")
    assert resolve_dataset(cfg).name == "Test-Blobs" and cfg.dataset == "Test-Blobs"
    train, test, got = build_datasets(cfg)
    assert got == info and train.data.shape == (10, 1, 8, 8) and len(test.targets) == 4

    for name, images, labels, message in [
            ("test-wrong-shape", np.zeros((3, 9, 9), np.uint8), np.zeros(3, np.int64),
             "its training images are 1x9x9, but its info says 1x8x8"),
            ("test-float-labels", np.zeros((3, 8, 8), np.uint8), np.zeros(3),
             "labels must be integers, one per image, got torch.float64"),
            ("test-fewer-labels", np.zeros((3, 8, 8), np.uint8), np.zeros(2, np.int64),
             "its training split has 3 images but 2 labels"),
            ("test-label-range", np.zeros((3, 8, 8), np.uint8), np.array([0, 1, 2]),
             "its loader gave label 2, but its DatasetInfo has classes 0 to 1")]:
        register_dataset(name, lambda cfg, train, t, a=images, b=labels: (a, b), info=info)
        with pytest.raises(ValueError, match=message):
            build_sources(DataConfig(dataset=name, batch_size=2), 1, CPU)
    with pytest.raises(ValueError, match="DatasetInfo.augment 'crop-flip' is not one of"):
        register_dataset("test-bad-info", blobs,
                         info=DatasetInfo((1, 8, 8), 2, (0.5,), (0.25,), "crop-flip"))
    with pytest.raises(ValueError, match="mean and std need one value per channel \\(3\\)"):
        register_dataset("test-bad-info", blobs, info=DatasetInfo((3, 8, 8), 2, (0.5,), (0.2,)))
    with pytest.raises(ValueError, match="--augment flip: ImageNet keeps the reference's"):
        resolve_dataset(DataConfig(dataset="ImageNet", augment="flip"))
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*Test-Blobs.*folder:PATH"):
        resolve_dataset(DataConfig(dataset="nope"))
    with pytest.raises(ValueError, match="--image-size applies to image folders"):
        resolve_dataset(DataConfig(dataset="MNIST", image_size=32))


def _truncate(root):
    f = root / "train" / "top" / "000.png"
    f.write_bytes(f.read_bytes()[:60])


def _odd_size(root):
    Image.new("RGB", (16, 12)).save(root / "train" / "top" / "odd.png")


BAD_FOLDERS = [
    # (id, what is done to a good folder (None: no folder at all), options, message)
    ("missing", None, {}, "does not exist; give the folder that holds train/"),
    ("no-train", lambda r: shutil.rmtree(r / "train"), {}, "has no train/ folder"),
    ("no-classes", lambda r: [shutil.rmtree(p) for p in (r / "train").iterdir()], {},
     "has no class folders"),
    ("empty-class", lambda r: (r / "train" / "empty").mkdir(), {},
     "class folder .*empty is empty; put its images there or remove the folder"),
    ("stray-file", lambda r: (r / "train" / "readme.txt").write_text("x"), {},
     "readme.txt is not in a class folder"),
    ("not-an-image", lambda r: (r / "train" / "top" / "notes.txt").write_text("hello"), {},
     "notes.txt is not an image that can be read"),
    ("undecodable", _truncate, {}, "000.png cannot be decoded .*replace it with a good copy"),
    ("test-class-train-lacks", lambda r: shutil.copytree(r / "test" / "top", r / "test" / "x"),
     {}, "has class folder\\(s\\) x that .* lacks"),
    ("colour-under-grayscale", None, {"image_mode": "L"},
     "--image-mode L asks for grayscale images, but .* is a colour image"),
    ("mixed-sizes", _odd_size, {}, "not all square and of one size"),
    ("one-image-per-class", lambda r: [shutil.rmtree(r / "test")] + [
        f.unlink() for f in (r / "train").rglob("*.png") if f.name != "000.png"], {},
     "no test images remain"),
]


@pytest.mark.parametrize("prepare,options,message", [r[1:] for r in BAD_FOLDERS],
                         ids=[r[0] for r in BAD_FOLDERS])
def test_a_bad_folder_is_refused_with_its_path_and_the_fix(tmp_path, prepare, options,
                                                           message):
    root = tmp_path / "pets"
    if prepare is not None or options:
        make_folder(root)
    if prepare is not None:
        prepare(root)
    with pytest.raises(FolderError, match=message):
        build_datasets(folder_cfg(root, **options))


def test_a_bad_folder_ends_the_command_line_run_with_one_line(tmp_path, capsys):
    root = make_folder(tmp_path / "pets")
    (root / "train" / "empty").mkdir()
    code = main(["train", "--dataset", f"folder:{root}", "--model", "mlp", "--epochs", "1",
                 "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("localloss-pp train: error: class folder ") and \
        err[-1].endswith("is empty; put its images there or remove the folder")
    assert not (tmp_path / "run" / "config.toml").exists()


def test_touched_files_renew_the_cache_but_not_the_runs_record_of_its_data(folder, caplog):
    _, _, before = build_datasets(folder_cfg(folder))
    f = folder / "train" / "top" / "003.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a copy elsewhere would be
    _, after = rebuilt(folder, caplog)
    assert "(files 0 added, 0 removed, 1 changed): decoding it again" in caplog.text
    assert after == before  # same names and sizes: the same data for a resumed run


def test_a_streamed_image_that_cannot_be_decoded_is_named_by_the_worker(folder):
    src = build_sources(folder_cfg(folder, in_memory="no", batch_size=48), 1, CPU,
                        num_workers=1)[0]
    _truncate(folder)  # damaged after the set-up read it: a worker meets it
    with pytest.raises(FolderError, match="^[^\\n]*000.png cannot be decoded") as err:
        list(src)
    assert "\n" not in str(err.value)
    src.close()


def test_a_registered_streamed_dataset_is_read_through_its_transform():
    info = DatasetInfo((3, 10, 10), 2, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2), "flip",
                       in_memory=False)

    class Pictures(torch.utils.data.Dataset):
        def __init__(self, n, transform):
            self.targets, self.transform = [i % 2 for i in range(n)], transform

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.transform(Image.new("RGB", (10, 10), (40 * i % 255, 0, 0))), \
                self.targets[i]

    register_dataset("test-pictures", lambda cfg, train, transform:
                     Pictures(20 if train else 6, transform), info=info)
    train, test, _ = build_sources(DataConfig(dataset="test-pictures", batch_size=8), 1, CPU)
    x, y, _ = next(iter(test))
    assert x.shape == (6, 3, 10, 10) and y.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.allclose(x[1, 0], torch.full((10, 10), (40 / 255 - 0.5) / 0.2))
    assert len(list(train)) == 3


def test_sixteen_bit_images_are_scaled_not_clipped_and_link_cycles_end(tmp_path):
    root = tmp_path / "scans"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            wide = np.full((8, 8), 256 * (40 * i + 100 * (c == "b")) + 255, dtype=np.uint16)
            Image.fromarray(wide).save(root / "train" / c / f"{i}.png")  # mode I;16
    (root / "train" / "a" / "loop").symlink_to(root / "train" / "a")
    train, test, info = build_datasets(folder_cfg(root, val_fraction=0.34))
    assert info.input_shape == (1, 8, 8) and len(train.targets) + len(test.targets) == 6
    values = sorted(int(v) for v in torch.cat([train.data, test.data]).flatten().unique())
    assert values == [0, 40, 80, 100, 140, 180]  # the top byte of each 16-bit value
