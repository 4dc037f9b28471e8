"""Time to accuracy on real data: the local pipeline against global backprop.

    python -m benchmarks.throughput --time-to-accuracy --data-dir DIR [--dataset MNIST]
        [--target-error 3.0] [--epochs 3] [--stages 2] [--json PATH] [--plot PATH]

Both runs are real `localloss-pp train` runs on the same data, model (mlp 3x1024) and cores:
the local pipeline (predsim) on S stages under torchrun, and global backprop in one process
with every core. Wall time is the cumulative training time of the epochs (evaluation excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from localloss_pp.observe.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, env, timeout):
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-3000:]}")


def _curve(run_dir: Path) -> list[dict]:
    t, out = 0.0, []
    for rec in read_jsonl(run_dir / "metrics.jsonl"):
        t += rec["train_time_s"]
        out.append({"epoch": rec["epoch"], "wall_s": t, "test_error": rec["test"]["error"]})
    return out


def _time_to(curve, target):
    return next((p["wall_s"] for p in curve if p["test_error"] <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput --time-to-accuracy")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--dataset", default="MNIST", choices=["MNIST", "FashionMNIST"])
    p.add_argument("--target-error", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    if not (Path(args.data_dir) / args.dataset / "raw").is_dir():
        p.error(f"{args.data_dir}/{args.dataset}/raw not found; pass --data-dir with the "
                "official files in <DIR>/<dataset>/raw")
    cores = os.cpu_count() or 1
    common = ["--model", "mlp", "--dataset", args.dataset, "--num-layers", "3", "--num-hidden",
              "1024", "--dropout", "0.1", "--epochs", str(args.epochs), "--lr-decay-milestones",
              "--data-dir", args.data_dir, "--no-progress", "--no-print-stats"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        local_dir, bp_dir = Path(tmp) / "local", Path(tmp) / "backprop"
        print(f"- local pipeline, predsim, {args.stages} stages ...", flush=True)
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
              str(args.stages), "-m", "localloss_pp", "train", *common, "--nonlin", "leakyrelu",
              "--run-dir", str(local_dir)], dict(env, OMP_NUM_THREADS="1"), args.timeout)
        curves["local pipeline (predsim)"] = _curve(local_dir)
        print("- global backprop, one process ...", flush=True)
        _run([sys.executable, "-m", "localloss_pp", "train", *common, "--backprop",
              "--threads-per-rank", str(cores), "--run-dir", str(bp_dir)], env, args.timeout)
        curves["global backprop"] = _curve(bp_dir)
    print(f"\n## Time to {args.target_error}% test error on {args.dataset} ({cores} cores)\n")
    print("| variant | epochs | final error | train wall time | time to target |")
    print("|---|---|---|---|---|")
    rows = []
    for name, curve in curves.items():
        tt = _time_to(curve, args.target_error)
        rows.append({"variant": name, "curve": curve, "time_to_target_s": tt})
        print(f"| {name} | {len(curve)} | {curve[-1]['test_error']:.2f}% | "
              f"{curve[-1]['wall_s']:.1f}s | {'not reached' if tt is None else f'{tt:.1f}s'} |")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "target_error": args.target_error,
                                         "cores": cores, "runs": rows}, indent=1))
        print(f"\nwrote {args.json}")
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in curves.items():
            ax.plot([0] + [c["wall_s"] for c in curve], [100] + [c["test_error"] for c in curve],
                    "o-", label=name)
        ax.axhline(args.target_error, color="gray", ls="--", lw=1)
        ax.set_ylim(0, max(10, 2 * args.target_error))
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"time to accuracy, {args.dataset}")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
