"""Cost model of the local-loss pipeline, and a projection to many GPUs.

`profile_blocks` measures, for every unit (blocks, then the output layer), the time of one
local-mode train step (forward, local losses, backward, optimizer step) and of the backbone
alone (forward + backward of the layer, as global backprop runs it), and counts their FLOPs
(matmuls and convolutions, torch.utils.flop_counter).

`predict` turns per-block times and a link bandwidth into the throughput of any partition:
every stage works in parallel, so a batch takes as long as the slowest stage (its blocks'
times) or the slowest link (bytes / bandwidth + latency); when the stages share fewer cores
than they have threads, the total work divided by the cores bounds it too.

`project` is a projection, not a measurement: a network of S blocks like the model's average
block, one GPU per stage, for the local pipeline, GPipe/1F1B and DDP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from localloss_pp.config import LossConfig, ModelConfig, OptimConfig
from localloss_pp.models.losses import onehot
from localloss_pp.models import build_model
from localloss_pp.pipeline.partition import (Partition, fold_output, time_ms, unit_input_shape,
                                             unit_step)

__all__ = ["BlockCost", "profile_blocks", "predict", "project", "stage_bytes", "count_flops",
           "arithmetic_of",
           "matmul_peak_flops", "PROJECTION_ASSUMPTIONS"]


@dataclass
class BlockCost:
    index: int
    name: str
    local_ms: float           # one local train step (layer + heads + update)
    backbone_ms: float        # forward + backward of the layer alone
    local_flops: float        # per batch, matmul/conv FLOPs of the local train step
    backbone_flops: float     # per batch, forward + backward of the layer alone
    params: int               # backprop-mode parameters of the unit
    out_bytes_per_sample: int  # activation this unit sends downstream (float32)


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def count_flops(model: ModelConfig, loss: LossConfig, input_shape, num_classes: int,
                batch_size: int) -> tuple[float, float]:
    """(local train step, backbone forward + backward) matmul/conv FLOPs per sample of the
    whole model, counted on the CPU (FLOPs do not depend on the device). The local units are
    counted apart from the backbone's, so that local modules (several backbone units in one)
    are counted as they train."""
    cpu = torch.device("cpu")
    local = build_model(model, loss, input_shape, num_classes, seed=11)
    bp = build_model(model, LossConfig(backprop=True), input_shape, num_classes, seed=11)
    y, y1h, gen = *_labels(num_classes, batch_size, cpu), torch.Generator().manual_seed(0)
    image = torch.randn((batch_size, *input_shape), generator=gen)
    local_flops = backbone_flops = 0.0
    for lu in local.units():
        _ready(lu, cpu)
        x = torch.randn((batch_size, *unit_input_shape(local, lu)), generator=gen)
        local_flops += _flops(unit_step(lu, x, y, y1h, image))
    for bu in bp.units():
        _ready(bu, cpu)
        x = torch.randn((batch_size, *unit_input_shape(bp, bu)), generator=gen)
        backbone_flops += _flops(_backbone_step(bu, x))
    return local_flops / batch_size, backbone_flops / batch_size


def _labels(num_classes: int, batch_size: int, device):
    """Synthetic labels and their one-hot codes."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(num_classes, (batch_size,), generator=gen).to(device)
    return y, onehot(y, num_classes)


def _ready(unit, device) -> None:
    """A throw-away unit set up to step (a tiny learning rate)."""
    unit.setup(device, OptimConfig())
    unit.set_lr(1e-6)


def _backbone_step(unit, x):
    """One forward + backward of a backprop-mode unit alone, as global backprop runs it."""
    xg = x.clone().requires_grad_(unit.index > 0)

    def step():
        unit(xg).float().sum().backward()
        unit.zero_grad(set_to_none=True)
    return step


def matmul_peak_flops(device, size: int | None = None, seconds: float = 0.5,
                      arithmetic: str = "fp32") -> float:
    """FLOP/s of a square matmul on `device` at the current thread count: the hardware
    reference against which the variants' achieved FLOP/s are a utilisation (MFU).
    `arithmetic`: "fp32" (TF32 off), "tf32" (fp32 tensors on TF32 tensor cores, CUDA) or
    "bf16"."""
    n = size or (4096 if device.type == "cuda" else 512)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if arithmetic == "bf16" else torch.float32
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = arithmetic == "tf32"
    try:
        reps = 2
        while True:
            ms = time_ms(lambda: torch.mm(a, b), reps, device, rounds=3)
            if ms * reps / 1000.0 >= seconds / 3 or reps >= 4096:
                return 2.0 * n ** 3 / (ms / 1000.0)
            reps *= 2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def arithmetic_of(precision: str, model_name: str, device: str) -> str:
    """The arithmetic most of a run's FLOPs use, whose peak its MFU is measured against:
    bf16 under --precision bf16; for fp32 on CUDA, TF32 where torch allows it for the layers
    that carry the FLOPs (convolutions: the VGGs and ResNets; matmuls: the mlp and the ViTs;
    cuDNN convolutions allow TF32 by default, matmuls do not), else fp32."""
    if precision == "bf16":
        return "bf16"
    if device != "cuda":
        return "fp32"
    if model_name == "mlp" or model_name.startswith("vit"):  # linear layers carry the FLOPs
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def profile_blocks(model: ModelConfig, loss: LossConfig, input_shape, num_classes: int,
                   batch_size: int, device, steps: int = 3) -> list[BlockCost]:
    """Per-unit costs at `batch_size` on `device` (synthetic inputs, throw-away weights)."""
    local = build_model(model, loss, input_shape, num_classes, seed=11)
    bp = build_model(model, LossConfig(backprop=True), input_shape, num_classes, seed=11)
    gen = torch.Generator().manual_seed(0)
    y, y1h = _labels(num_classes, batch_size, device)
    out = []
    for lu, bu in zip(local.units(), bp.units()):
        for u in (lu, bu):
            _ready(u, device)
        x = torch.randn((batch_size, *unit_input_shape(local, lu)), generator=gen).to(device)
        local_step = unit_step(lu, x, y, y1h)
        is_block = hasattr(lu, "train_forward")
        out_shape = lu.out_shape if is_block else (num_classes,)
        name = lu.describe() if is_block else "output " + lu.describe()
        backbone_step = _backbone_step(bu, x)
        timed = steps > 0  # steps=0: FLOPs only
        out.append(BlockCost(
            index=lu.index, name=name,
            local_ms=time_ms(local_step, steps, device, rounds=5) if timed else 0.0,
            backbone_ms=time_ms(backbone_step, steps, device, rounds=5) if timed else 0.0,
            local_flops=_flops(local_step), backbone_flops=_flops(backbone_step),
            params=sum(p.numel() for p in bu.parameters()),
            out_bytes_per_sample=4 * torch.Size(out_shape).numel()))
        for u in (lu, bu):
            u.to("cpu")
    return out


def stage_bytes(costs: list[BlockCost], counts: list[int], batch_size: int) -> list[int]:
    """Bytes sent downstream per batch by each stage but the last."""
    out, end = [], 0
    for c in counts[:-1]:
        end += c
        out.append(costs[end - 1].out_bytes_per_sample * batch_size)
    return out


def predict(costs: list[BlockCost], counts: list[int], batch_size: int, *,
            link_bytes_per_s: float, link_latency_s: float = 3e-4, cores: int | None = None,
            threads_per_stage: int = 1) -> dict:
    """Predicted steady-state samples/s of the local pipeline with this partition."""
    if sum(counts) != len(costs) - 1:
        raise ValueError(f"partition {counts} does not cover the {len(costs) - 1} blocks")
    stage_ms = Partition(counts, fold_output([c.local_ms for c in costs]), "manual",
                         "ms").stage_costs()
    link_ms = [1000.0 * (nbytes / link_bytes_per_s + link_latency_s)
               for nbytes in stage_bytes(costs, counts, batch_size)]
    bound = max(stage_ms + link_ms)
    shared = None
    if cores and len(counts) * threads_per_stage > cores:
        shared = sum(stage_ms) * threads_per_stage / cores
        bound = max(bound, shared)
    return {"counts": counts, "stage_ms": stage_ms, "link_ms": link_ms,
            "shared_core_ms": shared, "batch_ms": bound,
            "samples_per_s": 1000.0 * batch_size / bound}


PROJECTION_ASSUMPTIONS = """\
What the projection models (it measures nothing):
- the network grows with S: S blocks, each like the average block of the measured model, so
  one GPU per block and stage; the global batch stays the same for every S;
- '/ 1 GPU' divides by the samples/s of global backprop of the same S-block network on one
  GPU (so an ideal S-GPU scheme reaches S); per-block GPU time = the block's FLOPs at the
  assumed GPU peak scaled by the efficiency measured here for local and for backbone work;
- local pipeline: the slowest of one block's local step and its activation transfer;
- GPipe/1F1B: bubble (S-1)/(M+S-1), activation forward and gradient backward per micro-batch;
- DDP: every GPU runs all S blocks on batch/S samples; the ring all-reduce of every block's
  gradients (2 (S-1)/S x the model's bytes) overlaps with the backward pass, so a step takes
  the longer of the two. Below 1.0 the all-reduce alone takes longer than the whole one-GPU
  step: small per-sample compute (MNIST-size activations, batch 128) against S times the
  parameters to average over the link."""


def project(costs: list[BlockCost], batch_size: int, *, stages=range(2, 17),
            microbatches: int = 4, gpu_tflops: float = 60.0, links=None) -> list[dict]:
    """Projection for a network of S blocks like the model's average block, one GPU per stage.

    Per-block GPU time = FLOPs / (gpu_tflops x efficiency), where the efficiency of local and
    backbone work is taken relative to the best block measured on this machine (small, head-
    heavy work runs less efficiently). Returns rows of samples/s and ratios to one-GPU
    backprop for: the local pipeline, GPipe and 1F1B (bubble (S-1)/(M+S-1), activation and
    gradient transfers per micro-batch), DDP (ring all-reduce overlapped with backward)."""
    links = links or {"NVLink-class (300 GB/s)": 300e9, "PCIe-class (25 GB/s)": 25e9}
    blocks = costs[:-1]
    rate = [b.local_flops / b.local_ms for b in blocks] + [b.backbone_flops / b.backbone_ms
                                                          for b in blocks]
    best = max(rate)
    eff_local = sum(b.local_flops / b.local_ms for b in blocks) / len(blocks) / best
    eff_bb = sum(b.backbone_flops / b.backbone_ms for b in blocks) / len(blocks) / best
    local_flops = sum(b.local_flops for b in blocks) / len(blocks)
    bb_flops = sum(b.backbone_flops for b in blocks) / len(blocks)
    params = sum(b.params for b in blocks) / len(blocks)
    act = sum(b.out_bytes_per_sample for b in blocks) / len(blocks) * batch_size
    peak = gpu_tflops * 1e12
    t_local = local_flops / (peak * eff_local)   # s per batch per block
    t_bb = bb_flops / (peak * eff_bb)
    rows = []
    for link_name, bw in links.items():
        for S in stages:
            one_gpu = batch_size / (S * t_bb)
            local = batch_size / max(t_local, act / bw)
            bubble = (S - 1) / (microbatches + S - 1)
            pp_step = (t_bb + 2 * act / bw) * (microbatches + S - 1) / microbatches
            pp = batch_size / pp_step
            allreduce = 2 * (S - 1) / S * 4 * params * S / bw
            ddp = batch_size / max(S * t_bb / S, allreduce)
            rows.append({"link": link_name, "stages": S, "one_gpu_backprop": one_gpu,
                         "local_pipeline": local, "gpipe_1f1b": pp, "ddp": ddp,
                         "bubble": bubble, "local_vs_one_gpu": local / one_gpu,
                         "pp_vs_one_gpu": pp / one_gpu, "ddp_vs_one_gpu": ddp / one_gpu})
    return rows
