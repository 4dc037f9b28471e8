"""PNG curves of a run directory's metrics.jsonl (needs matplotlib: the `plots` extra)."""
from __future__ import annotations

from pathlib import Path

from localloss_pp.observe.metrics import read_jsonl
from localloss_pp.observe.record import EpochRecord

__all__ = ["plot_run", "pyplot"]


def pyplot(purpose: str):
    """matplotlib.pyplot drawing to files only (the Agg backend: no display needed), or a
    one-line ValueError that says how to install it ("`purpose` needs matplotlib: ...")."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(f"{purpose} needs matplotlib: pip install matplotlib "
                         "(or pip install 'localloss-pp[plots]')") from None
    return plt


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None,
             depth_epochs: list[int] | None = None) -> list[Path]:
    """Write test_error.png (train/test error per epoch), local_error.png (per block, per
    epoch), local_error_depth.png (per block against depth at `depth_epochs`, by default the
    first, middle and last) and stages.png (each stage's busy and waiting time per epoch)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass the --run-dir of a training run")
    records = [EpochRecord.from_json(r) for r in read_jsonl(metrics)]
    if not records:
        raise ValueError(f"{metrics} is empty: the run has not finished an epoch yet")
    plt = pyplot("plotting")
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r.epoch for r in records]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r.train.error for r in records], "o-", label="train")
    ax.plot(epochs, [r.test.error for r in records], "o-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_title(f"{run_dir.name}: output-layer error")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "test_error.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    blocks = records[-1].blocks
    if any(b.train["error"] is not None for b in blocks):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, b in enumerate(blocks):
            if b.train["error"] is None:
                continue
            ys = [r.blocks[i].test["error"] for r in records]
            ax.plot(epochs, ys, "o-", label=f"block {b.index} {b.name}")
        written.append(_save(plt, fig, ax, out_dir / "local_error.png", "epoch",
                             "local decoder error (%)", "per-block local error (test set)", 7))
        written.append(_error_vs_depth(plt, records, out_dir, depth_epochs))
    if any(r.stages for r in records):
        written.append(_stage_bars(plt, records, out_dir))
    return written


def _pick_epochs(records: list[EpochRecord], chosen) -> list[EpochRecord]:
    if chosen:
        by_epoch = {r.epoch: r for r in records}
        missing = [e for e in chosen if e not in by_epoch]
        if missing:
            raise ValueError(f"--epochs {','.join(map(str, chosen))}: the run has no record of "
                             f"epoch {missing[0]} (it has {records[0].epoch} to "
                             f"{records[-1].epoch})")
        return [by_epoch[e] for e in chosen]
    picks = sorted({0, len(records) // 2, len(records) - 1})  # first, middle, last
    return [records[i] for i in picks]


def _error_vs_depth(plt, records, out_dir: Path, chosen) -> Path:
    """The paper's picture: each block's local (test) decoder error against its depth, at a
    few epochs: deeper blocks learn better features."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for rec in _pick_epochs(records, chosen):
        blocks = [b for b in rec.blocks if b.test["error"] is not None]
        ax.plot([b.index + 1 for b in blocks], [b.test["error"] for b in blocks], "o-",
                label=f"epoch {rec.epoch}")
        ax.axhline(rec.test.error, ls=":", lw=1, color=ax.lines[-1].get_color())
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(plt, fig, ax, out_dir / "local_error_depth.png", "block (depth)",
                 "local decoder test error (%)", "local error vs depth (dotted: the output layer)",
                 8)


def _save(plt, fig, ax, path: Path, xlabel: str, ylabel: str, title: str,
          legend_size: int) -> Path:
    """Labels, grid and legend of a line figure, then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _stage_bars(plt, records, out_dir: Path) -> Path:
    """Per epoch and stage, the training time split into busy, data, receive wait, send wait
    and replica-sync wait (stacked bars, one group of bars per epoch)."""
    parts = [("busy_s", "busy", "#2ca02c"), ("data_s", "data", "#8c564b"),
             ("wait_recv_s", "recv wait", "#d62728"), ("wait_send_s", "send wait", "#ff7f0e"),
             ("wait_sync_s", "sync wait", "#e377c2")]
    recs = [r for r in records if r.stages]
    num_stages = max(len(r.stages) for r in recs)
    width = 0.8 / num_stages
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(recs) * num_stages + 2), 4))
    labelled = set()
    for k in range(num_stages):
        xs = [i + (k - (num_stages - 1) / 2) * width for i in range(len(recs))]
        bottom = [0.0] * len(recs)
        for key, label, colour in parts:
            values = [(r.stages[k]["train"].get(key) or 0.0) if k < len(r.stages)
                      else 0.0 for r in recs]
            if not any(values):
                continue
            ax.bar(xs, values, width * 0.9, bottom=bottom, color=colour,
                   label=None if label in labelled else label, edgecolor="white",
                   linewidth=0.3)
            labelled.add(label)
            bottom = [b + v for b, v in zip(bottom, values)]
        for x, top in zip(xs, bottom):
            ax.text(x, top, str(k + 1), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels([str(r.epoch) for r in recs])
    ax.set_xlabel("epoch (one bar per stage, numbered)")
    ax.set_ylabel("training time (s)")
    ax.set_title("where each stage's training time goes")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    path = out_dir / "stages.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
