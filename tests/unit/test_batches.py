"""The batched data path of the first stage against the reference's torchvision transforms."""
import numpy as np
import pytest
import torch
from PIL import Image

from localloss_pp.data.batches import BatchAugment, normalize
from localloss_pp.seeds import augment_seed
from localloss_pp.config import DataConfig
from localloss_pp.data.datasets import DATASETS, Cutout, Mnist5k, build_sources, dataset_arrays

CPU = torch.device("cpu")


def _tv(info, pil_images):
    from torchvision import transforms as T
    tf = T.Compose([T.ToTensor(), T.Normalize(info.mean, info.std)])
    return torch.stack([tf(im) for im in pil_images])


def _max_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors."""
    ia = a.contiguous().view(torch.int32).to(torch.int64)
    ib = b.contiguous().view(torch.int32).to(torch.int64)
    return int((ia - ib).abs().max())


def test_test_batches_equal_totensor_normalize_mnist5k():
    cfg = DataConfig(dataset="mnist5k", batch_size=100)
    _, test, info = build_sources(cfg, 1, CPU)
    ref = Mnist5k(train=False)
    x, y, y_host = next(iter(test))
    expected = _tv(info, [Image.fromarray(ref.data[i], mode="L") for i in range(100)])
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert _max_ulps(x, expected) <= 1
    assert y_host.tolist() == ref.targets[:100] and torch.equal(y, y_host)


@pytest.mark.parametrize("name", ["CIFAR10", "SVHN", "STL10"])
def test_normalisation_of_colour_images_equals_torchvision(name):
    info = DATASETS[name]
    c, h, w = info.input_shape
    hwc = np.random.default_rng(0).integers(0, 256, (6, h, w, c), dtype=np.uint8)
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    ours = normalize(torch.from_numpy(hwc).permute(0, 3, 1, 2), mean, std)
    assert _max_ulps(ours, _tv(info, [Image.fromarray(a) for a in hwc])) <= 1


def test_crop_equals_torchvision_pad_and_crop_at_the_same_offsets():
    from torchvision.transforms import functional as TF
    pad = 4
    aug = BatchAugment(pad=pad, flip=False, mean=(0.5,) * 3, std=(0.25,) * 3, cutout=None,
                       device=CPU)
    hwc = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()
    gen = torch.Generator().manual_seed(5)
    out = aug.crop(x, gen)
    gen.manual_seed(5)  # the same draws: the offsets the crop used
    top = torch.randint(0, 2 * pad + 1, (16, 1), generator=gen).flatten().tolist()
    left = torch.randint(0, 2 * pad + 1, (16, 1), generator=gen).flatten().tolist()
    for i in range(16):
        ref = TF.crop(TF.pad(Image.fromarray(hwc[i]), pad, fill=0), top[i], left[i], 32, 32)
        assert torch.equal(out[i], torch.from_numpy(np.array(ref)).permute(2, 0, 1))


def _probe_batches(pad: int, flip: bool, batches: int = 40, bs: int = 128):
    """Augmented batches of an image with one bright pixel left of the centre."""
    img = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    img[0, 0, 14, 11] = 255
    aug = BatchAugment(pad=pad, flip=flip, mean=(0.0,), std=(1.0,), cutout=None, device=CPU)
    gen = torch.Generator()
    out = []
    for seq in range(batches):
        gen.manual_seed(augment_seed(1, 1, 0, seq))
        out.append(aug(img.expand(bs, -1, -1, -1), gen))
    return torch.cat(out)


def test_crop_shifts_are_uniform_over_every_offset():
    pad = 2
    x = _probe_batches(pad, flip=False)
    pos = x.flatten(1).argmax(1)
    dy, dx = pos // 28 - 14, pos % 28 - 11
    assert ((x.flatten(1) > 0).sum(1) == 1).all()  # the pixel is never cropped away here
    counts = torch.zeros(2 * pad + 1, 2 * pad + 1)
    for a, b in zip(dy.tolist(), dx.tolist()):
        counts[a + pad, b + pad] += 1
    n, k = len(dy), counts.numel()
    expected = n / k
    sigma = (expected * (1 - 1 / k)) ** 0.5
    assert (counts - expected).abs().max() < 5 * sigma, counts  # every offset about equally often
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 70  # 24 degrees of freedom: p < 1e-6 above this


def test_flip_rate_is_one_half_and_only_where_the_reference_flips():
    x = _probe_batches(0, flip=True)
    col = x.flatten(1).argmax(1) % 28
    flipped = (col == 27 - 11).float()
    assert ((col == 11) | (col == 16)).all()
    n = len(col)
    assert abs(float(flipped.mean()) - 0.5) < 5 * (0.25 / n) ** 0.5
    assert (_probe_batches(2, flip=False).flatten(1).argmax(1) % 28 <= 13).all()


def test_cutout_squares_follow_the_reference_geometry():
    length = 10
    aug = BatchAugment(pad=0, flip=False, mean=(0.0,) * 3, std=(1 / 255,) * 3,
                       cutout=(1, length), device=CPU)
    ones = torch.ones(64, 3, 16, 16, dtype=torch.uint8)
    out = aug(ones, torch.Generator().manual_seed(3))
    masks = (out != 0)
    assert torch.equal(masks[:, 0], masks[:, 1]) and torch.equal(masks[:, 1], masks[:, 2])
    ref = Cutout(1, length)
    for m in masks[:, 0].float():
        assert any(torch.equal(m, ref.mask(16, 16, [(cy, cx)]))
                   for cy in range(16) for cx in range(16))
    assert masks[:, 0].float().mean() < 0.9  # holes were cut


def test_resumed_epoch_yields_the_same_batches():
    cfg = DataConfig(dataset="mnist5k", batch_size=256, cutout=True, length=14)
    train, _, _ = build_sources(cfg, 7, CPU)
    train.set_epoch(3)
    whole = list(train)
    train.set_epoch(3, skip=5)
    rest = list(train)
    assert len(rest) == len(whole) - 5
    for a, b in zip(whole[5:], rest):
        assert all(torch.equal(p, q) for p, q in zip(a, b))
    train.set_epoch(4)
    assert not torch.equal(next(iter(train))[0], whole[0][0])


def test_replica_shards_are_the_parts_of_the_global_batch():
    cfg = DataConfig(dataset="mnist5k", batch_size=100, cutout=True)
    parts = [list(build_sources(cfg, 1, CPU, r, 3)[0]) for r in range(3)]
    whole = list(build_sources(cfg, 1, CPU)[0])
    assert all(len(p) == len(whole) == 40 for p in parts)
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([p[i][2] for p in parts]), batch[2])
        assert [len(p[i][2]) for p in parts] == [34, 33, 33]


def test_nclass_sampler_feeds_the_batched_path():
    cfg = DataConfig(dataset="mnist5k", batch_size=64, classes_per_batch=2)
    train, _, _ = build_sources(cfg, 1, CPU)
    batches = list(train)
    full = [b for b in batches if len(b[2]) == 64]
    assert sum(len(set(b[2].tolist())) == 2 for b in full) >= 0.75 * len(full)
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == sorted(
        torch.from_numpy(np.asarray(Mnist5k(train=True).targets)).tolist())


def test_dataset_arrays_match_the_per_image_path():
    ds = Mnist5k(train=True)
    images, labels = dataset_arrays(ds)
    assert images.shape == (4000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[17, 0], torch.from_numpy(ds.data[17]))
    assert labels.tolist() == ds.targets


def _image_folder(root, n_per_class=6):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / "ImageNet" / split / c
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")


def test_image_folder_batches_do_not_depend_on_the_worker_count(tmp_path):
    _image_folder(tmp_path)
    cfg = DataConfig(dataset="ImageNet", data_dir=str(tmp_path), batch_size=5)
    runs = []
    for workers in (0, 2):
        train, test, _ = build_sources(cfg, 1, CPU, num_workers=workers)
        train.set_epoch(2)
        runs.append((list(train), list(test)))
        train.close(), test.close()  # the workers end now (a collector would take 5 s each)
    (train0, test0), (train2, test2) = runs
    assert len(train0) == 3 and [len(b[2]) for b in train0] == [5, 5, 2]
    for a, b in zip(train0 + test0, train2 + test2):
        assert a[0].shape[1:] == (3, 224, 224)
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


def test_closing_an_image_folder_source_ends_its_workers_at_once(tmp_path):
    # its persistent workers sit in a reference cycle (the batch sampler points back at the
    # source): left to the cyclic collector they took 5 s each to end
    import multiprocessing
    import time
    _image_folder(tmp_path)
    cfg = DataConfig(dataset="ImageNet", data_dir=str(tmp_path), batch_size=5)
    train, test, _ = build_sources(cfg, 1, CPU, num_workers=2)
    before = set(multiprocessing.active_children())
    list(train)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    start = time.monotonic()
    train.close(), test.close()
    assert not any(w.is_alive() for w in workers) and time.monotonic() - start < 2.0


def test_num_workers_auto_rule():
    from localloss_pp.data.datasets import resolve_num_workers
    assert resolve_num_workers("3", CPU, 2, 1) == 3
    cores = __import__("os").cpu_count()
    assert resolve_num_workers("auto", CPU, 2, cores // 2) == cores - 2 * (cores // 2)
    assert resolve_num_workers("auto", CPU, 1, cores) == 0
