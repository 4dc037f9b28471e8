"""The activation-memory sweep of the throughput benchmark (--memory-sweep M1,M2,...): memory per
rank of the pipelines at M micro-batches of a fixed size m, its table and its plot.

The backprop schedules (GPipe, 1F1B and the virtual-stage ones chosen with --variants) train a
global batch of M x m in M micro-batches, as they must to keep the pipeline full; the local
pipeline has no micro-batches and streams batches of m: measured at every M all the same. One
launch per variant runs every M in turn (the worker's `points`).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from localloss_pp.pipeline.partition import balanced_split

from .common import pyplot
from .runs import base_spec, first_error, memory_summary, num_blocks, run_variant, virtual_counts
from .schedules import LABELS, PIPELINES, VIRTUAL_STAGES

# few batches per point (the figure is a peak, not a rate)
SWEEP_WARMUP, SWEEP_BATCHES = 2, 3

SWEEP_NOTE = ("MB per rank: the largest over the ranks of the peak bytes autograd holds saved "
              "for backward over the measured batches (parameters and input batches excluded) "
              "plus the rank's buffers (receive buffers and sends in flight); * buffers "
              "computed from their shapes. The schedules run a global batch of M x m in M "
              "micro-batches; the local pipeline runs batches of m at every M (it has no "
              "micro-batches).")


def memory_sweep(args, model_name: str, mcfg: dict, counts, cores: int) -> list[dict]:
    """One row per variant, loss (the local pipeline: each loss; the schedules: the first, they
    do not use it), precision and M of --memory-sweep; a point or a launch that fails, or a
    variant that cannot run here, gets a row with its error. `counts`: the throughput runs'
    split, or None for one by equal block counts."""
    mcfg = dict(mcfg, dropout=0.0)
    S = args.stages
    counts = counts or balanced_split([1.0] * num_blocks(mcfg), S)
    losses = args.losses.split(",")
    base = dict(base_spec(args, mcfg), warmup=SWEEP_WARMUP, batches=SWEEP_BATCHES,
                threads=max(1, cores // S), counts=counts,
                vcounts=virtual_counts(num_blocks(mcfg) + 1, S * VIRTUAL_STAGES))
    jobs = [(loss, "local") for loss in losses] + \
        [(losses[0], v) for v in args.variant_list if v in PIPELINES]
    m, rows = args.sweep_microbatch, []
    for precision in args.precisions:
        for loss, variant in jobs:
            local = variant == "local"
            points = [{"microbatches": M, "batch_size": m if local else M * m}
                      for M in args.sweep]
            row = {"model": model_name, "loss": loss if local else "-", "precision": precision,
                   "variant": variant, "label": LABELS[variant], "ranks": S,
                   "micro_batch_size": m, "counts": counts}
            if variant in args.unrunnable:
                per_point = [[{"error": args.unrunnable[variant]}] for _ in points]
            else:
                spec = dict(base, loss={"loss_sup": loss}, precision=precision, points=points)
                per_point = _launch(args, model_name, variant, spec, precision)
            rows += [_point_row(row, point, ranks) for point, ranks in zip(points, per_point)]
    return rows


def _launch(args, model_name: str, variant: str, spec: dict, precision: str) -> list[list]:
    """Every point's per-rank results of one launch, or [{"error": why}] for each point when
    the launch fails."""
    local = variant == "local"
    print(f"- {model_name} memory sweep, {LABELS[variant]}"
          f"{' ' + spec['loss']['loss_sup'] if local else ''} {precision}, M = "
          f"{','.join(map(str, args.sweep))} ...", flush=True)
    try:
        ranks = sorted(run_variant(variant, spec, args.stages, args.timeout),
                       key=lambda r: r["rank"])
        return [[dict(r["points"][i], rank=r["rank"]) for r in ranks]
                for i in range(len(spec["points"]))]
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        why = first_error(exc)
        print(f"  not run: {why}", flush=True)
        return [[{"error": why}] for _ in spec["points"]]


def _point_row(row: dict, point: dict, ranks: list[dict]) -> dict:
    """The row of one point: its memory per rank, or the first rank's error."""
    out = dict(row, microbatches=point["microbatches"], batch_size=point["batch_size"])
    error = next((r["error"] for r in ranks if "error" in r), None)
    if error is not None:
        out["error"] = error
    else:
        out.update(memory_summary(ranks))
    return out


def _key(r: dict) -> tuple:
    return r["model"], r["loss"], r["precision"], r["variant"]


def sweep_markdown(rows: list[dict], sweep: list[int]) -> str:
    """Rows: variant (and loss, precision); columns: M; cells: MB per rank (max over ranks of
    saved activations + buffers), or "not run: reason"."""
    lines = ["| model | loss | precision | variant | " +
             " | ".join(f"M={M}" for M in sweep) + " |", "|" + "---|" * (4 + len(sweep))]
    for key in dict.fromkeys(_key(r) for r in rows):
        cells = {r["microbatches"]: r for r in rows if _key(r) == key}
        out = []
        for M in sweep:
            r = cells.get(M)
            if r is None or "error" in r:
                out.append(f"not run: {r['error'] if r else 'no result'}")
            else:
                star = "" if r["buffers_measured"] else "*"
                out.append(f"{r['activation_memory_bytes_max'] / 2 ** 20:.2f}{star}")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {LABELS[key[3]]} | " +
                     " | ".join(out) + " |")
    return "\n".join(lines)


def sweep_plot(rows: list[dict], sweep: list[int], path: Path) -> None:
    """MB per rank (max over ranks of saved + buffers) against M, one line per variant (and
    loss), one panel per model and precision; points that did not run are left out (the
    table says why)."""
    plt = pyplot()
    panels = list(dict.fromkeys((r["model"], r["precision"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        _draw_panel(ax, [r for r in rows if (r["model"], r["precision"]) == panel], sweep)
        ax.set_title(f"{panel[0]}, {panel[1]}: saved activations + buffers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw_panel(ax, rows: list[dict], sweep: list[int]) -> None:
    """One model and precision: a line per variant (the local pipeline: per loss)."""
    palette = iter(["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown",
                    "tab:pink", "tab:gray", "tab:olive", "tab:cyan"] * 2)
    styles = iter(["-", "--", ":", "-."] * 4)  # the local pipeline, one line per loss
    for variant, loss in dict.fromkeys((r["variant"], r["loss"]) for r in rows):
        pts = {r["microbatches"]: r for r in rows if (r["variant"], r["loss"]) == (variant, loss)}
        ys = [pts[M]["activation_memory_bytes_max"] / 2 ** 20
              if M in pts and "error" not in pts[M] else float("nan") for M in sweep]
        local = variant == "local"
        label = LABELS[variant] + (f" ({loss})" if local else "")
        ax.plot(sweep, ys, marker="o", label=label, linewidth=2.5 if local else 1.5,
                color="tab:green" if local else next(palette),
                linestyle=next(styles) if local else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sweep, [str(M) for M in sweep])
    ax.set_xlabel(f"micro-batches M (micro-batch of {rows[0]['micro_batch_size']} samples)")
    ax.set_ylabel("activation memory, MB per rank (max over ranks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def print_sweep(args, rows: list[dict]) -> dict:
    """Print the sweep's table and note; return its JSON entry."""
    print(f"\n## Activation memory per rank against M (MB; micro-batches of "
          f"{args.sweep_microbatch} samples, {args.stages} ranks)\n")
    print(sweep_markdown(rows, args.sweep))
    print("\n" + SWEEP_NOTE)
    return {"microbatches": args.sweep, "micro_batch_size": args.sweep_microbatch,
            "warmup": SWEEP_WARMUP, "batches": SWEEP_BATCHES, "rows": rows}
