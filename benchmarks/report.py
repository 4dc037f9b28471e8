"""The throughput mode's output: the Markdown tables (throughput, ratios, FLOPs, cost model,
projection) printed after the runs, and the bar chart of --plot.
"""
from __future__ import annotations

from pathlib import Path

from .common import pyplot
from .costmodel import PROJECTION_ASSUMPTIONS
from .schedules import SCHEDULES

ACT_NOTE = ("act. MB/rank: the largest over ranks of the peak bytes autograd holds saved for "
            "backward over the measured batches (parameters and input batches excluded) plus "
            "the rank's buffers (receive buffers, sends in flight, DDP's gradient buckets); in "
            "brackets the largest saved and the largest buffers (ranks may differ); * buffers "
            "computed from their shapes, not read from the objects.")


def group(r: dict) -> tuple:
    """The rows compared with each other: one model, loss and precision."""
    return r["model"], r["loss"], r["precision"]


def markdown(rows: list[dict]) -> str:
    """The throughput table, a row per result (a 'not run' row says why)."""
    lines = ["| model | loss | precision | variant | ranks x threads | samples/s | windows min-max "
             "| vs (a) | pipeline efficiency | idle/bubble | GFLOP/s per rank | MFU (peak) "
             "| peak MB/rank | act. MB/rank (saved + buffers) | bytes/sample |",
             "|" + "---|" * 15]
    for r in rows:
        head = (f"| {r['model']} | {r['loss']} | {r['precision']} | {r['label']} | "
                f"{r['ranks']}x{r['threads_per_rank']} | ")
        lines.append(head + (f"not run: {r['error']} |" + " |" * 9 if "error" in r
                             else _cells(r)))
    return "\n".join(lines)


def _cells(r: dict) -> str:
    """The measured cells of one row, from samples/s on."""
    eff = f"{r['pipeline_efficiency']:.3f}" if r["variant"] == "local" else "-"
    bub = f"{r['bubble_fraction']:.2f}" if "bubble_fraction" in r and \
        r["variant"] != "local1" else "-"
    if r.get("bubble_how") == "ideal":
        bub += " (ideal)"
    w = r["window_samples_per_s"]
    return (f"{r['samples_per_s']:.0f} | {min(w):.0f}-{max(w):.0f} | "
            f"{r['samples_per_s'] / r['vs_local']:.2f} | {eff} | {bub} | "
            f"{r['flop_per_s_per_rank'] / 1e9:.2f} | "
            f"{100 * r['mfu']:.1f}% ({r['peak_arithmetic']}) | "
            f"{max(r['peak_memory_mb']):.0f} | {_act_mb(r)} | {r['bytes_per_sample']:.0f} |")


def _act_mb(r: dict) -> str:
    """The activation memory cell: max over ranks of saved + buffers, in MB (* where buffers
    are computed from their shapes)."""
    if "activation_memory_bytes_max" not in r:
        return "-"
    star = "" if r.get("buffers_measured", True) else "*"
    return (f"{r['activation_memory_bytes_max'] / 2 ** 20:.2f}{star} "
            f"({r['saved_activation_bytes_max'] / 2 ** 20:.2f} + "
            f"{r['buffer_bytes_max'] / 2 ** 20:.2f})")


def ratio_matrix(rows: list[dict]) -> str:
    """Every row's samples/s over every column's, the variants named by their letters."""
    names = [f"{r['label'].split()[0]}" for r in rows]
    lines = ["| row / column | " + " | ".join(names) + " |", "|" + "---|" * (len(rows) + 1)]
    for r, n in zip(rows, names):
        lines.append(f"| {n} | " + " | ".join(f"{r['samples_per_s'] / c['samples_per_s']:.2f}"
                                              for c in rows) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """A bar chart of samples/s per variant, a panel per model, loss and precision."""
    plt = pyplot()
    groups = sorted({group(r) for r in results})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (model, loss, precision) in zip(axes[0], groups):
        rows = [r for r in results if group(r) == (model, loss, precision) and "error" not in r]
        ax.bar([r["label"].split(" ", 1)[0] for r in rows], [r["samples_per_s"] for r in rows],
               color=["tab:green" if SCHEDULES[r["variant"]].local else "tab:gray"
                      for r in rows])
        ax.set_title(f"{model}, local loss {loss}, {precision}")
        ax.set_ylabel("samples/s")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results, costmodel_rows, projection, peaks: dict, device: str) -> None:
    """Print every table of the throughput mode (each `vs (a)` against its group's local
    pipeline, which is stored in the rows as `vs_local`)."""
    for g in sorted({group(r) for r in results}):
        rows = [r for r in results if group(r) == g]
        ref = next(r for r in rows if r["variant"] == "local")["samples_per_s"]
        for r in rows:
            r["vs_local"] = ref
    print("\n## Throughput (samples/s: median over windows; 'vs (a)': this / local pipeline)\n")
    print(markdown(results))
    print("\n" + ACT_NOTE)
    unit = "GPU" if device == "cuda" else "thread"
    print("\nMFU: achieved matmul/conv training FLOP/s over the matmul peak of the arithmetic "
          "the row runs (in brackets), measured in this run (" + ", ".join(
              f"{name} {flops / 1e9:.1f} GFLOP/s" for name, flops in peaks.items()) +
          f" per {unit}), times the {unit}s each variant uses.")
    _print_ratios(results)
    if projection:
        _print_flops(projection)
    if costmodel_rows:
        _print_costmodel(costmodel_rows)
    if projection:
        _print_projection(projection)


def _print_ratios(results: list[dict]) -> None:
    """Per group, the ratio matrix and the local pipeline's per-stage busy and wait times."""
    for g in sorted({group(r) for r in results}):
        rows = [r for r in results if group(r) == g and "error" not in r]
        print(f"\n### Ratios, {' '.join(g)} (row samples/s / column samples/s)\n")
        print(ratio_matrix(rows))
        for r in rows:
            if "stages" in r:
                print(f"\n{r['label']}: " + "; ".join(
                    f"stage {i + 1} busy {100 * s['busy_fraction']:.0f}% recv-wait "
                    f"{s['wait_recv_s']:.2f}s send-wait {s['wait_send_s']:.2f}s"
                    for i, s in enumerate(r["stages"])))


def _print_flops(projection: list[dict]) -> None:
    print("\n## FLOPs per sample (matmul/conv, training step)\n")
    print("| model | backbone (fwd+bwd) | local heads (extra) | heads / backbone |")
    print("|---|---|---|---|")
    for pj in projection:
        f = pj["flops"]
        print(f"| {pj['model']} | {f['backbone_flops_per_sample'] / 1e6:.1f} MFLOP | "
              f"{f['heads_flops_per_sample'] / 1e6:.1f} MFLOP | "
              f"{f['heads_flops_per_sample'] / f['backbone_flops_per_sample']:.2f} |")


def _print_costmodel(costmodel_rows: list[dict]) -> None:
    print("\n## Cost model vs measurement (local pipeline, 1 thread per stage)\n")
    print("| model | loss | stages | partition | predicted | measured | error |")
    print("|---|---|---|---|---|---|---|")
    for c in costmodel_rows:
        print(f"| {c['model']} | {c['loss']} | {c['stages']} | {c['counts']} | "
              f"{c['predicted']:.0f} | {c['measured']:.0f} | {100 * c['error']:+.1f}% |")


def _print_projection(projection: list[dict]) -> None:
    print("\n## PROJECTION (not measured): S GPUs, a network of S blocks like the model's "
          "average block\n")
    print(PROJECTION_ASSUMPTIONS + "\n")
    print("| model | link | S | local / 1 GPU | GPipe,1F1B / 1 GPU | DDP / 1 GPU | bubble |")
    print("|---|---|---|---|---|---|---|")
    for pj in projection:
        for r in pj["rows"]:
            if r["stages"] in (2, 4, 8, 16):
                print(f"| {pj['model']} | {r['link']} | {r['stages']} | "
                      f"{r['local_vs_one_gpu']:.2f} | {r['pp_vs_one_gpu']:.2f} | "
                      f"{r['ddp_vs_one_gpu']:.2f} | {r['bubble']:.2f} |")
