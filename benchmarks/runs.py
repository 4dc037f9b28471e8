"""One run of one variant: its spec, its launch (benchmarks/worker.py, under torchrun for several
ranks) and the summary of its ranks' JSON; several repeats combined into one row; the row of a
variant that could not run. Shared by the throughput, memory-sweep and timeline modes.
"""
from __future__ import annotations

import json
import re
import statistics
import tempfile
from pathlib import Path

from localloss_pp.config import LossConfig, ModelConfig

from .common import INPUT_SHAPE, NUM_CLASSES, launch, python_module
from .schedules import LABELS, SCHEDULES


def base_spec(args, mcfg: dict) -> dict:
    """What every run of one model shares."""
    return {"model": mcfg, "batch_size": args.batch_size, "warmup": args.warmup,
            "batches": args.batches, "microbatches": args.microbatches, "device": args.device}


def num_blocks(mcfg: dict) -> int:
    """The blocks of the model `mcfg` (the output layer not counted)."""
    from localloss_pp.models import build_model
    return len(build_model(ModelConfig(**mcfg), LossConfig(), INPUT_SHAPE, NUM_CLASSES, 0,
                           materialize=()).blocks)


def virtual_counts(units: int, chunks: int) -> list[int]:
    """Units (blocks and the output layer) per virtual stage: contiguous, as equal as the
    counts allow; [] when there are fewer units than virtual stages (the worker says so)."""
    if units < chunks:
        return []
    return [units // chunks + (1 if c < units % chunks else 0) for c in range(chunks)]


def run_variant(variant: str, spec: dict, ranks: int, timeout: float) -> list[dict]:
    """Launch one variant (torchrun for several ranks) and return every rank's JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(dict(spec, variant=variant)))
        launch(python_module("benchmarks.worker", str(spec_path), tmp, ranks=ranks),
               f"variant {variant}", timeout, threads=spec["threads"])
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def first_error(exc: Exception) -> str:
    """The reason a variant's launch failed, in one line: its first Python error."""
    text = str(exc)
    m = re.search(r"\[rank\d+\]: (\w+(?:Error|Exception): [^\n]*)", text)
    line = m.group(1) if m else next((ln for ln in reversed(text.splitlines()) if ln.strip()),
                                     text)
    return line.strip()[:160]


def summarise(variant: str, ranks: list[dict], spec: dict, windows: int) -> dict:
    """One run's row from its ranks' JSON: the median samples/s over `windows` windows of the
    measured batches, memory per rank, bytes on the wire, and the idle share (bubble) of the
    local pipeline and of the backprop pipeline schedules."""
    rep = next(r for r in ranks if r.get("report"))
    stamps = rep["timestamps"]
    per = max(1, (len(stamps) - 1) // windows)
    rates = [per * spec["batch_size"] / (stamps[i + per] - stamps[i])
             for i in range(0, len(stamps) - per, per)]
    schedule = SCHEDULES[variant]
    out = {"variant": variant, "label": schedule.label, "ranks": len(ranks),
           "threads_per_rank": ranks[0]["threads"], "samples_per_s": statistics.median(rates),
           "window_samples_per_s": rates,
           "peak_memory_mb": [round(r["peak_memory_bytes"] / 2 ** 20, 1) for r in ranks]}
    out.update(memory_summary(ranks))
    out["bytes_per_sample"] = sum(r.get("bytes_per_batch", 0) for r in ranks) / spec["batch_size"]
    out["bytes_how"] = "measured" if schedule.local else "analytic"
    if schedule.local:
        out.update(_local_idle(ranks, out["samples_per_s"] / spec["batch_size"]))
    elif schedule.pipeline:
        out.update(_schedule_bubble(schedule, ranks, spec["microbatches"]))
    return out


def _local_idle(ranks: list[dict], batches_per_s: float) -> dict:
    """The local pipeline's efficiency, idle share and per-stage times, and its link speed."""
    stages = [r["times"] for r in sorted(ranks, key=lambda r: r["rank"])]
    slowest = max(s["busy_s"] / max(s["batches"], 1) for s in stages)
    return {"pipeline_efficiency": batches_per_s * slowest,
            "bubble_fraction": 1 - statistics.mean(s["busy_fraction"] for s in stages),
            "stages": [{k: s[k] for k in ("busy_fraction", "wait_recv_s", "wait_send_s",
                                          "busy_s", "wall_s", "batches")} for s in stages],
            "link_bytes_per_s": next((r["link_bytes_per_s"] for r in ranks
                                      if r.get("link_bytes_per_s")), None)}


def _schedule_bubble(schedule, ranks: list[dict], microbatches: int) -> dict:
    """A pipeline schedule's bubble: measured (CPU: 1 - the ranks' mean busy fraction), else its
    ideal (S - 1) / (V M + S - 1) where the schedule has that ideal."""
    S, out = len(ranks), {}
    if schedule.ideal_bubble:
        out["bubble_ideal"] = (S - 1) / (schedule.virtual * microbatches + S - 1)
    busy = [r for r in ranks if r.get("busy_s") is not None and r.get("wall_s")]
    if len(busy) == len(ranks):
        out["busy_fraction_per_rank"] = [r["busy_s"] / r["wall_s"] for r in
                                         sorted(busy, key=lambda r: r["rank"])]
        out["bubble_fraction"] = 1 - statistics.mean(out["busy_fraction_per_rank"])
        out["bubble_how"] = "measured"
    elif "bubble_ideal" in out:
        out["bubble_fraction"] = out["bubble_ideal"]
        out["bubble_how"] = "ideal"
    return out


def memory_summary(ranks: list[dict]) -> dict:
    """A variant's activation memory from its ranks' JSON (in rank order): per rank and the
    maximum over ranks of the saved activations (peak over the measured batches), the buffer
    bytes, and their sum (`activation_memory_bytes_*`); `buffers_measured` is false when some
    rank's buffers are computed from their shapes instead of read from the objects."""
    ranks = sorted(ranks, key=lambda r: r.get("rank", 0))
    if any(r.get("saved_activation_bytes") is None for r in ranks):
        return {}
    saved = [int(r["saved_activation_bytes"]) for r in ranks]
    buffers = [int(r.get("buffer_bytes", 0)) for r in ranks]
    return memory_totals(saved, buffers, all(r.get("buffers_measured", True) for r in ranks),
                         [r.get("buffer_parts", {}) for r in ranks])


def memory_totals(saved: list[int], buffers: list[int], measured: bool, parts: list) -> dict:
    """The memory entries of a row from the per-rank saved and buffer bytes."""
    act = [s + b for s, b in zip(saved, buffers)]
    return {"saved_activation_bytes_per_rank": saved, "saved_activation_bytes_max": max(saved),
            "buffer_bytes_per_rank": buffers, "buffer_bytes_max": max(buffers),
            "buffer_parts_per_rank": parts, "buffers_measured": measured,
            "activation_memory_bytes_per_rank": act, "activation_memory_bytes_max": max(act)}


def not_run(variant: str, ranks: int, threads: int, why: str) -> dict:
    """The row of a variant that could not run in this configuration, with the reason."""
    return {"variant": variant, "label": LABELS[variant], "ranks": ranks,
            "threads_per_rank": threads, "error": why}


def combine(reps: list[dict]) -> dict:
    """One row from the summaries of several repeats of the same variant."""
    failed = next((r for r in reps if "error" in r), None)
    if failed is not None:
        return dict(failed)
    out = dict(reps[-1])
    windows = [w for r in reps for w in r["window_samples_per_s"]]
    out["window_samples_per_s"] = windows
    out["samples_per_s"] = statistics.median(windows)
    out["repeat_samples_per_s"] = [r["samples_per_s"] for r in reps]
    out["peak_memory_mb"] = [max(v) for v in zip(*(r["peak_memory_mb"] for r in reps))]
    if all("saved_activation_bytes_per_rank" in r for r in reps):  # per rank, the largest
        out.update(memory_totals(
            [max(v) for v in zip(*(r["saved_activation_bytes_per_rank"] for r in reps))],
            [max(v) for v in zip(*(r["buffer_bytes_per_rank"] for r in reps))],
            all(r["buffers_measured"] for r in reps), reps[-1]["buffer_parts_per_rank"]))
    for key in ("pipeline_efficiency", "bubble_fraction"):
        if key in out:
            out[key] = statistics.median(r[key] for r in reps)
    return out
