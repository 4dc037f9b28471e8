"""The timeline mode of the throughput benchmark (--timeline PNG): profiler timelines of the local
pipeline, GPipe and 1F1B on the same model, split, batch and ranks, one above the other on one
time scale.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from localloss_pp.observe.profiling import plot_timelines
from localloss_pp.pipeline.partition import balanced_split

from .options import models
from .runs import base_spec, num_blocks, run_variant


def _titles(microbatches: int) -> dict:
    """The variants drawn, in order, with the titles of their timelines."""
    return {"local": "local pipeline (local losses, no backward between stages)",
            "gpipe": f"GPipe, {microbatches} micro-batches (global backprop)",
            "1f1b": f"1F1B, {microbatches} micro-batches (global backprop)"}


def timelines(args, cores: int) -> int:
    """Trace --timeline-batches measured batches of each variant (GPipe and 1F1B when
    --variants has them) on the first model and draw them into --timeline."""
    model_name, mcfg = models(args)[0]
    S = args.stages
    counts = balanced_split([1.0] * num_blocks(mcfg), S)
    groups = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant, title in _titles(args.microbatches).items():
            if variant != "local" and variant not in args.variant_list:
                continue
            folder = Path(tmp) / variant
            spec = dict(base_spec(args, mcfg), loss={"loss_sup": args.losses.split(",")[0]},
                        threads=max(1, cores // S), counts=counts,
                        trace={"dir": str(folder), "start": 2, "steps": args.timeline_batches})
            print(f"- {model_name} {variant}: tracing {args.timeline_batches} batches ...",
                  flush=True)
            run_variant(variant, spec, S, args.timeout)
            groups.append((f"{model_name}, {S} stages: {title}",
                           sorted(folder.glob("stage*.json"))))
        out = plot_timelines(groups, args.timeline)
    print(f"wrote {out}")
    return 0
