"""PNG curves of a run directory's metrics.jsonl (needs matplotlib: the `plots` extra)."""
from __future__ import annotations

from pathlib import Path

from .metrics import read_jsonl

__all__ = ["plot_run"]


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write test_error.png (train/test error per epoch) and local_error.png (per block)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{run_dir} has no metrics.jsonl; pass the --run-dir of a training run")
    records = read_jsonl(metrics)
    if not records:
        raise ValueError(f"{metrics} is empty: the run has not finished an epoch yet")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install matplotlib "
                         "(or pip install 'localloss-pp[plots]')") from None
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in records]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train"]["error"] for r in records], "o-", label="train")
    ax.plot(epochs, [r["test"]["error"] for r in records], "o-", label="test")
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

    blocks = records[-1].get("blocks") or []
    if any(b["train"]["error"] is not None for b in blocks):
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in blocks:
            if b["train"]["error"] is None:
                continue
            split = "test" if "test" in b else "train"
            ys = [r["blocks"][b["index"]][split]["error"] for r in records]
            ax.plot(epochs, ys, "o-", label=f"block {b['index']} {b['name']}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("local decoder error (%)")
        ax.set_title("per-block local error (test set)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "local_error.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
