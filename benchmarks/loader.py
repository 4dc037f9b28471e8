"""The first stage's data path alone: batches/s of every dataset path next to the pipeline's
demand, so it is clear which side is the bottleneck.

    python -m benchmarks.loader [--data-dir DIR] [--batch-size 128] [--batches 60] [--json PATH]

Paths measured (training batches with the reference's augmentation, on --device):
- in-memory, batched tensor operations (batches.TensorBatches): the embedded mnist5k, MNIST and
  FashionMNIST when --data-dir holds them, and arrays of the CIFAR, SVHN and STL10 shapes with
  their augmentations (random pixels: the speed does not depend on the content);
- per image through PIL and torchvision transforms in a DataLoader (the path every in-memory
  dataset took before; mnist5k), with 0 workers;
- an image folder (the ImageNet path: PNG files decoded by workers, RandomResizedCrop 224 and
  flip) with 0 workers and with `--num-workers auto`.

Demand: the batches/s that one process training the whole model consumes (the sum of the
measured train-step times of its units), and that a balanced S-stage pipeline would consume
(S times as many). A loader well above the demand keeps the first stage from waiting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from localloss_pp.data.batches import BatchAugment, EpochBatches, TensorBatches
from localloss_pp.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from localloss_pp.data.datasets import DATASETS, build_datasets, build_sources, resolve_num_workers
from localloss_pp.pipeline.partition import profile_unit_times

from .common import environment

DEMAND_MODELS = {  # the model each input size is trained with in the reference's recipes
    (1, 28, 28): ("mlp 3x1024", {"name": "mlp", "num_layers": 3, "num_hidden": 1024}),
    (3, 32, 32): ("vgg8b x0.25", {"name": "vgg8b", "feat_mult": 0.25, "dim_in_decoder": 1024}),
}


def batches_per_s(source, device, batches: int, epoch: int = 1) -> float:
    """Median over 3 windows of the batches/s of `source` (warm-up batches excluded)."""
    source.set_epoch(epoch)

    def stream():
        while True:
            yield from source

    it = stream()
    for _ in range(3):
        next(it)
    per_window = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(max(1, batches // 3)):
            next(it)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_window.append(max(1, batches // 3) / (time.perf_counter() - start))
    return statistics.median(per_window)


def pil_loader_per_s(cfg: DataConfig, batches: int) -> float:
    """The per-image path: torchvision transforms on PIL images in a DataLoader (0 workers)."""
    from torch.utils.data import DataLoader
    train_set, _, _ = build_datasets(cfg)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, num_workers=0)

    class Source:
        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            return iter(loader)
    return batches_per_s(Source(), torch.device("cpu"), batches)


def synthetic_source(name: str, cfg: DataConfig, device, n: int = 4096) -> TensorBatches:
    info = DATASETS[name]
    images = torch.from_numpy(np.random.default_rng(0).integers(
        0, 256, (n, *info.input_shape), dtype=np.uint8))
    labels = torch.arange(n) % info.num_classes
    cutout = (1, {"CIFAR10": 16, "SVHN": 16, "STL10": 48}.get(name, 14)) if cfg.cutout else None
    aug = BatchAugment(pad=info.crop_padding, flip=info.flips, mean=info.mean, std=info.std,
                       cutout=cutout, device=device)
    return TensorBatches(images, labels, EpochBatches(labels.numpy(), cfg, 1), aug,
                         device=device, seed=1)


def image_folder(root: Path, n: int = 192) -> None:
    rng = np.random.default_rng(0)
    from PIL import Image
    for split in ("train", "val"):
        for c in range(4):
            folder = root / "ImageNet" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // 4):
                Image.fromarray(rng.integers(0, 256, (300, 360, 3), dtype=np.uint8)).save(
                    folder / f"{i}.png")


def demand(input_shape, device, batch_size: int) -> tuple[str, float] | None:
    """(model, batches/s) one process consumes training the whole model."""
    if input_shape not in DEMAND_MODELS:
        return None
    name, model = DEMAND_MODELS[input_shape]
    cfg = Config(model=ModelConfig(**model), loss=LossConfig(),
                 data=DataConfig(dataset="MNIST", batch_size=batch_size), train=TrainConfig())
    info = DATASETS["MNIST" if input_shape[0] == 1 else "CIFAR10"]
    ms = sum(profile_unit_times(cfg, info.input_shape, info.num_classes, device))
    return name, 1000.0 / ms


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder with MNIST/ and FashionMNIST/ raw")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--batches", type=int, default=60, help="measured batches per path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stages", type=int, default=2, help="S of the pipeline demand column")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _row(path: str, dataset: str, per_s: float, samples: int, shape) -> dict:
    """One measured path (`samples`: its batch size), printed as it comes."""
    print(f"  {dataset:<14} {path:<34} {per_s:9.1f} batches/s", flush=True)
    return {"path": path, "dataset": dataset, "batches_per_s": per_s,
            "samples_per_s": per_s * samples, "input_shape": list(shape)}


def _in_memory_rows(args, device) -> list[dict]:
    """The batched in-memory paths (real mnist5k, MNIST and FashionMNIST; arrays of the
    CIFAR, SVHN and STL10 shapes) and the per-image PIL path."""
    bs, rows = args.batch_size, []
    real = [("mnist5k", None)]
    if args.data_dir:
        real += [(n, args.data_dir) for n in ("MNIST", "FashionMNIST")
                 if (Path(args.data_dir) / n / "raw").is_dir()]
    for name, root in real:
        cfg = DataConfig(dataset=name, batch_size=bs, data_dir=root or "data")
        train, _, info = build_sources(cfg, 1, device)
        rows.append(_row("in-memory, batched", name, batches_per_s(train, device, args.batches),
                         bs, info.input_shape))
    cfg5k = DataConfig(dataset="mnist5k", batch_size=bs)
    rows.append(_row("per image (PIL), 0 workers", "mnist5k",
                     pil_loader_per_s(cfg5k, args.batches), bs, (1, 28, 28)))
    for name, cutout in (("CIFAR10", False), ("CIFAR10", True), ("SVHN", False),
                         ("STL10", False)):
        cfg = DataConfig(dataset=name, batch_size=bs, cutout=cutout)
        rows.append(_row("in-memory, batched" + (" + cutout" if cutout else ""), name + " (shape)",
                         batches_per_s(synthetic_source(name, cfg, device), device, args.batches),
                         bs, DATASETS[name].input_shape))
    return rows


def _image_folder_rows(args, device) -> list[dict]:
    """The image-folder path (PNG files decoded by DataLoader workers), with 0 workers and with
    `--num-workers auto`; batches of at most 32 (printed as batches of --batch-size)."""
    bs, small, rows = args.batch_size, min(args.batch_size, 32), []
    with tempfile.TemporaryDirectory() as tmp:
        image_folder(Path(tmp))
        auto = resolve_num_workers("auto", device, 1, 1)
        for workers in sorted({0, max(1, auto)}):
            cfg = DataConfig(dataset="ImageNet", data_dir=tmp, batch_size=small)
            train, _, _ = build_sources(cfg, 1, device, num_workers=workers)
            per_s = batches_per_s(train, device, max(6, args.batches // 10))
            rows.append({"path": f"image folder, {workers} workers", "dataset": "ImageNet-like",
                         "batches_per_s": per_s, "samples_per_s": per_s * small,
                         "input_shape": [3, 224, 224]})
            print(f"  {'ImageNet-like':<14} {'image folder, %d workers' % workers:<34} "
                  f"{per_s * small / bs:9.1f} batches/s (of {bs})", flush=True)
    return rows


def _print_demand_table(rows: list[dict], args, device) -> None:
    """Every path's samples/s next to the demand of the model trained on its input size (one
    process, and a balanced pipeline of --stages stages); adds the demand to the rows."""
    bs = args.batch_size
    print()
    print(f"| dataset | path | samples/s | demand: model | 1 process | {args.stages} stages | "
          "loader / pipeline demand |")
    print("|---|---|---:|---|---:|---:|---:|")
    cache = {}
    for r in rows:
        shape = tuple(r["input_shape"])
        if shape not in cache:
            cache[shape] = demand(shape, device, bs)
        d = cache[shape]
        if d is None:
            print(f"| {r['dataset']} | {r['path']} | {r['samples_per_s']:,.0f} | - | - | - | - |")
            continue
        one = d[1] * bs
        r.update(demand_model=d[0], demand_samples_per_s=one)
        print(f"| {r['dataset']} | {r['path']} | {r['samples_per_s']:,.0f} | {d[0]} | "
              f"{one:,.0f} | {args.stages * one:,.0f} | "
              f"{r['samples_per_s'] / (args.stages * one):.1f}x |")


def main(argv=None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
    env = environment()
    print(f"# loader benchmark, {env}, device {device}, batch {args.batch_size}, "
          f"one compute thread", flush=True)
    rows = _in_memory_rows(args, device) + _image_folder_rows(args, device)
    _print_demand_table(rows, args, device)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "device": str(device),
                                               "batch_size": args.batch_size, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
