"""Time to accuracy on real data, at sub-epoch resolution: the local pipeline against backprop.

    python -m benchmarks.tta --data-dir DIR [--dataset MNIST|FashionMNIST] [--seeds 1,2,3]
        [--epochs 3] [--stages 2] [--points-per-epoch 20] [--variants ...] [--targets 3,2,1.5]
        [--model-args "..."] [--local-modules K] [--json PATH] [--plot PATH]

Every variant is a real `localloss-pp train` run of the same model (by default mlp 3x1024, leaky
ReLU, dropout 0.1; `--model-args` gives another, e.g. "--model resnet32 --feat-mult 0.25"),
batch 128, Adam at the default learning rate, no decay, on the same data and cores,
with `--snapshot-every K` (K = batches per epoch // points per epoch): every stage keeps its
weights every K batches, stamped with its training time so far (evaluation, epoch-end
statistics, checkpoints and the copies themselves left out). After each run the snapshots are
evaluated on the whole test set in this process, so evaluation costs the runs nothing. A point's
time is the slowest stage's stamp. Variants:

  local-pred, local-predsim      the local pipeline, S stages under torchrun (one thread each)
  local1-pred, local1-predsim    the same local algorithm in one process, every core
  local-NAME, local1-NAME        the same with any registered objective (dgl, infopro, ...;
                                 `--local-modules K` groups the units for every local variant)
  backprop1                      global backprop in one process, every core
  ddp                            global backprop data-parallel on S ranks (`--backprop
                                 --replicas S`: the batch split, gradients all-reduced every step)

The backprop pipeline schedules (GPipe, 1F1B, Interleaved1F1B, ZB1P) update the weights exactly
as one-process backprop does on the same batches, so their curves are DERIVED, not run: the
backprop1 curve with its time axis stretched by the ratio of the schedules' measured samples/s
to backprop1's (`benchmarks.throughput` on the same model, ranks and machine, measured at the
start of this command). Times to each target error are the median over the seeds with their
range.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

from .common import environment, launch, python_module, pyplot
from .schedules import PIPELINES, SCHEDULES

VARIANTS = ("local-pred", "local-predsim", "local1-pred", "local1-predsim", "backprop1", "ddp")
# the derived curves: the backprop pipeline schedules of the throughput benchmark's default suite
DERIVED = tuple(name for name in PIPELINES if SCHEDULES[name].default)
LABELS = {"local-pred": "local pipeline, pred", "local-predsim": "local pipeline, predsim",
          "local1-pred": "local, 1 process, pred", "local1-predsim": "local, 1 process, predsim",
          "backprop1": "backprop, 1 process", "ddp": "backprop data-parallel",
          **{name: f"{SCHEDULES[name].title} (derived)" for name in DERIVED}}
DEFAULT_TARGETS = {"MNIST": "3,2,1.5", "FashionMNIST": "15,12"}
TRAIN_EXAMPLES = {"MNIST": 60000, "FashionMNIST": 60000}
MODEL = ["--model", "mlp", "--num-layers", "3", "--num-hidden", "1024", "--nonlin", "leakyrelu",
         "--dropout", "0.1"]
NO_DECAY = ["--lr-decay-milestones"]  # an empty list: the learning rate stays where it starts


def label(variant: str) -> str:
    """A variant's name in the tables: the fixed ones, or local[1]-<objective>."""
    if variant in LABELS:
        return LABELS[variant]
    kind, objective = variant.split("-", 1)
    return f"local {'pipeline' if kind == 'local' else '1 process'}, {objective}"


def valid_variant(variant: str) -> bool:
    """backprop1, ddp, or local-/local1- and a registered objective's name."""
    if variant in VARIANTS:
        return True
    kind, _, objective = variant.partition("-")
    if kind not in ("local", "local1") or not objective:
        return False
    from localloss_pp.models import registered_objectives
    return objective in registered_objectives()


def _floats(text: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: give comma-separated numbers, got {text!r}")
    if not out or any(not (0 < v < 100) for v in out):
        raise argparse.ArgumentTypeError(f"{what}: every value must lie in (0, 100), got {text!r}")
    return out


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: give comma-separated integers, got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError(f"{what}: give at least one value")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tta", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder holding <dataset>/raw")
    p.add_argument("--dataset", default="MNIST", choices=["MNIST", "FashionMNIST"])
    p.add_argument("--seeds", default="1,2,3", help="run seeds; times are their median (1,2,3)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (3)")
    p.add_argument("--stages", type=int, default=2, help="ranks of the multi-rank variants (2)")
    p.add_argument("--points-per-epoch", type=int, default=20,
                   help="snapshots per epoch, at least (20)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"runs, any of {','.join(VARIANTS)}, or local-NAME / local1-NAME for "
                   "any registered objective (default: the first six)")
    p.add_argument("--model-args", default=" ".join(MODEL),
                   help="the model's train flags, the same for every variant (default: the "
                   "mlp 3x1024 of the paper's MNIST recipe)")
    p.add_argument("--local-modules", default="",
                   help="--local-modules for every local variant (default: none)")
    p.add_argument("--derived", default=",".join(DERIVED),
                   help=f"derived backprop pipeline curves, any of {','.join(DERIVED)}, or "
                   "none (default all; needs backprop1)")
    p.add_argument("--targets", default=None, help="target test errors in %% (MNIST 3,2,1.5; "
                   "FashionMNIST 15,12)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    args = p.parse_args(argv)
    try:
        args.seeds = _ints(args.seeds, "--seeds")
        args.targets = _floats(args.targets or DEFAULT_TARGETS[args.dataset], "--targets")
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if not valid_variant(v)]
    if bad or not args.variants:
        p.error(f"--variants: unknown {bad}; choose from {','.join(VARIANTS)}, or "
                "local-NAME / local1-NAME for a registered objective")
    args.model_args = shlex.split(args.model_args)
    args.derived = [] if args.derived == "none" else [v for v in args.derived.split(",") if v]
    bad = [v for v in args.derived if v not in DERIVED]
    if bad:
        p.error(f"--derived: unknown {bad}; choose from {','.join(DERIVED)} or none")
    if args.derived and args.model_args != MODEL:
        p.error("--derived stretches backprop's curve by the schedules' samples/s measured on "
                "the mlp; with --model-args pass --derived none")
    if args.derived and "backprop1" not in args.variants:
        p.error("--derived curves stretch the backprop1 curve: add backprop1 to --variants, or "
                "pass --derived none")
    for name, value, low in (("--epochs", args.epochs, 1), ("--stages", args.stages, 2),
                             ("--points-per-epoch", args.points_per_epoch, 1)):
        if value < low:
            p.error(f"{name} must be >= {low}, got {value}")
    if not (Path(args.data_dir) / args.dataset / "raw").is_dir():
        p.error(f"{args.data_dir}/{args.dataset}/raw not found; pass --data-dir with the "
                "official files in <DIR>/<dataset>/raw")
    return args


def _command(variant: str, args, seed: int, every: int, run_dir: Path, cores: int):
    """(argv, OMP threads) of one run."""
    common = ["train", *getattr(args, "model_args", MODEL), *NO_DECAY, "--dataset",
              args.dataset, "--data-dir", args.data_dir, "--epochs", str(args.epochs), "--seed",
              str(seed), "--snapshot-every", str(every), "--no-progress", "--no-print-stats",
              "--run-dir", str(run_dir)]
    kind, _, loss = variant.partition("-")
    if kind in ("local", "local1"):
        local = ["--loss-sup", loss]
        if getattr(args, "local_modules", ""):
            local += ["--local-modules", args.local_modules]
        if kind == "local":
            return python_module("localloss_pp", *common, *local, "--threads-per-rank", "1",
                                 ranks=args.stages), 1
        return python_module("localloss_pp", *common, *local, "--threads-per-rank",
                             str(cores)), cores
    if variant == "backprop1":
        return python_module("localloss_pp", *common, "--backprop", "--threads-per-rank",
                             str(cores)), cores
    return python_module("localloss_pp", *common, "--backprop", "--replicas", str(args.stages),
                         "--threads-per-rank", "1", ranks=args.stages), 1


def time_to(curve: list[dict], target: float) -> float | None:
    """Training time of the first point at or below `target` % test error (None: never)."""
    return next((p["train_s"] for p in curve if p["test_error"] <= target), None)


def summary(times: list[float | None]) -> dict:
    """Median and range over seeds; a seed that never reaches the target counts as infinite,
    so the median is None when half or more never reach it."""
    vals = sorted(math.inf if t is None else t for t in times)
    med = statistics.median(vals)
    return {"median_s": None if math.isinf(med) else med,
            "min_s": None if math.isinf(vals[0]) else vals[0],
            "max_s": None if math.isinf(vals[-1]) else vals[-1],
            "reached": sum(t is not None for t in times), "seeds": len(times)}


def step_rates(args, cores: int) -> dict:
    """samples/s of backprop1 and of each derived schedule, measured now by benchmarks.throughput
    on the same model (synthetic batches, so the ratio is the schedules' alone)."""
    variants = ",".join(["backprop1", *args.derived])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rates.json"
        launch(python_module("benchmarks.throughput", "--models", "mlp", "--losses", "pred",
                             "--variants", variants, "--stages", str(args.stages),
                             "--no-costmodel", "--repeats", "1", "--json", str(out)),
               "benchmarks.throughput", args.timeout)
        rows = json.loads(out.read_text())["results"]
    rates = {}
    for row in rows:
        key = row.get("variant")
        if row.get("samples_per_s"):
            rates[key] = row["samples_per_s"]
    return rates


def _fmt(s: dict) -> str:
    if s["median_s"] is None:
        return f"not reached ({s['reached']}/{s['seeds']})"
    text = f"{s['median_s']:.1f}s"
    if s["seeds"] > 1:
        hi = "-" if s["max_s"] is None else f"{s['max_s']:.1f}"
        text += f" [{s['min_s']:.1f}-{hi}]"
        if s["reached"] < s["seeds"]:
            text += f" ({s['reached']}/{s['seeds']})"
    return text


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _fmt_error(s: dict) -> str:
    """'1.05%' for one seed; '1.05 ± 0.07% [0.98-1.12]' for several."""
    if s["n"] == 1:
        return f"{s['mean']:.2f}%"
    return f"{s['mean']:.2f} ± {s['sd']:.2f}% [{s['min']:.2f}-{s['max']:.2f}]"


def epoch_errors(curve: list[dict]) -> list[float]:
    """The test error at the end of every epoch: the last point of each epoch."""
    last = {}
    for p in curve:
        last[p["epoch"]] = p["test_error"]
    return [last[e] for e in sorted(last)]


def table(rows: list[dict], targets: list[float]) -> str:
    head = ("| variant | ranks x threads | points/epoch | final error | samples/s | "
            + " | ".join(f"time to {t:g}%" for t in targets) + " |")
    lines = [head, "|" + "---|" * (5 + len(targets))]
    for r in rows:
        lines.append(f"| {r['label']} | {r['ranks']}x{r['threads']} | {r['points_per_epoch']} | "
                     f"{_fmt_error(r['final'])} | {r['samples_per_s']:.0f} | "
                     + " | ".join(_fmt(r["time_to"][f"{t:g}"]) for t in targets) + " |")
    return "\n".join(lines)


def epoch_table(rows: list[dict]) -> str:
    """Test error at the end of every epoch, mean ± sd over the seeds (derived rows left out:
    their errors are backprop1's)."""
    rows = [r for r in rows if not r["derived"]]
    epochs = max(len(r["per_epoch"]) for r in rows)
    lines = ["| variant | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
             "|" + "---|" * (1 + epochs)]
    for r in rows:
        cells = [_fmt_error(s) for s in r["per_epoch"]]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mean_curve(curves: list[list[dict]]) -> tuple[list[float], list[float], list[float],
                                                 list[float]]:
    """(time, mean error, min error, max error) point by point over the seeds' curves (the
    same snapshot schedule in every seed; cut to the shortest)."""
    n = min(len(c) for c in curves)
    cols = [[c[i] for c in curves] for i in range(n)]
    return ([statistics.fmean(p["train_s"] for p in col) for col in cols],
            [statistics.fmean(p["test_error"] for p in col) for col in cols],
            [min(p["test_error"] for p in col) for col in cols],
            [max(p["test_error"] for p in col) for col in cols])


def plot(rows: list[dict], args, path: Path) -> None:
    """Test error against training time: every row's mean over the seeds (time and error
    averaged point by point), its range over the seeds shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        t, mean, lo, hi = mean_curve(r["curves"])
        line, = ax.plot(t, mean, "--" if r["derived"] else "-", lw=1.3, label=r["label"])
        if len(r["curves"]) > 1 and not r["derived"]:
            ax.fill_between(t, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    for t in args.targets:
        ax.axhline(t, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_ylim(min(args.targets) * 0.6, 30)
    ax.set_xlabel("training wall time (s): evaluation excluded")
    ax.set_ylabel("test error (%)")
    seeds = (f"seed {args.seeds[0]}" if len(args.seeds) == 1 else
             f"mean of seeds {','.join(map(str, args.seeds))}, shaded: their range")
    title = f"{args.dataset}, {model_name(args)}, {seeds}"
    if any(r["derived"] for r in rows):
        title += "; dashed: derived from backprop's curve"
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_variant(variant: str, args, every: int, cores: int, tmp: Path) -> dict:
    """Every seed of one variant: a real training run each, its snapshots evaluated after it."""
    from localloss_pp.run.snapshots import evaluate_run
    curves = []
    for seed in args.seeds:
        run_dir = tmp / f"{variant}-s{seed}"
        cmd, threads = _command(variant, args, seed, every, run_dir, cores)
        t0 = time.perf_counter()
        launch(cmd, " ".join(cmd[:8]) + " ...", args.timeout, threads=threads)
        curve = evaluate_run(run_dir)
        curves.append(curve)
        print(f"- {label(variant)}, seed {seed}: {len(curve)} points, final "
              f"{curve[-1]['test_error']:.2f}% at {curve[-1]['train_s']:.1f}s "
              f"(run and evaluation {time.perf_counter() - t0:.0f}s)", flush=True)
        shutil.rmtree(run_dir / "snapshots", ignore_errors=True)
    ranks = args.stages if variant.startswith("local-") or variant == "ddp" else 1
    return {"variant": variant, "label": label(variant), "derived": False, "ranks": ranks,
            "threads": 1 if ranks > 1 else cores, "curves": curves}


def _derived_rows(args, rows: list[dict], rates: dict) -> list[dict]:
    """The backprop pipeline schedules' curves: backprop1's, the time axis stretched by the
    ratio of the measured samples/s."""
    base = next((r for r in rows if r["variant"] == "backprop1"), None)
    out = []
    for name in args.derived:
        if base is None or name not in rates or "backprop1" not in rates:
            print(f"- {LABELS[name]}: no measured samples/s, left out")
            continue
        stretch = rates["backprop1"] / rates[name]
        out.append({"variant": name, "label": LABELS[name], "derived": True,
                    "ranks": args.stages, "threads": 1, "stretch": stretch,
                    "curves": [[dict(p, train_s=p["train_s"] * stretch) for p in c]
                               for c in base["curves"]]})
    return out


def _times_to_targets(rows: list[dict], args, batches: int, every: int) -> None:
    """Add every row's points per epoch, final and per-epoch errors over the seeds, samples/s
    (training examples over the final point's training time, median over the seeds) and times
    to the targets."""
    examples = TRAIN_EXAMPLES[args.dataset] * args.epochs
    for r in rows:
        r["points_per_epoch"] = math.ceil(batches / every)
        r["final"] = spread([c[-1]["test_error"] for c in r["curves"]])
        r["final_error"] = statistics.median(c[-1]["test_error"] for c in r["curves"])
        per_epoch = [epoch_errors(c) for c in r["curves"]]
        r["per_epoch"] = [spread([e[i] for e in per_epoch])
                          for i in range(min(len(e) for e in per_epoch))]
        r["samples_per_s"] = statistics.median(examples / c[-1]["train_s"] for c in r["curves"])
        r["time_to"] = {f"{t:g}": summary([time_to(c, t) for c in r["curves"]])
                        for t in args.targets}


def model_name(args) -> str:
    """The model of the runs in words: mlp 3x1024 by default, else its flags."""
    given = getattr(args, "model_args", MODEL)
    text = "mlp 3x1024" if given == MODEL else " ".join(given)
    if getattr(args, "local_modules", ""):
        text += f", --local-modules {args.local_modules}"
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    batches = math.ceil(TRAIN_EXAMPLES[args.dataset] / 128)
    every = max(1, batches // args.points_per_epoch)
    env_info = environment()
    print(f"# time to accuracy, {args.dataset}, {model_name(args)} (seeds {args.seeds}, "
          f"{args.epochs} epochs, a snapshot every {every} of {batches} batches)")
    print(f"machine: {cores} cores, {env_info['platform']}, torch {env_info['torch']}, git "
          f"{env_info['git_revision']}, {time.strftime('%Y-%m-%d')}", flush=True)
    started = time.perf_counter()
    rates = step_rates(args, cores) if args.derived else {}
    if rates:
        print("samples/s for the derived curves (benchmarks.throughput, synthetic batches): "
              + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [_run_variant(v, args, every, cores, Path(tmp)) for v in args.variants]
    rows += _derived_rows(args, rows, rates)
    _times_to_targets(rows, args, batches, every)
    print(f"\n## Time to test error on {args.dataset} (median of {len(args.seeds)} seed(s) "
          f"[range]; final error: mean ± sd [range]; training time only)\n")
    print(table(rows, args.targets))
    print("\n## Test error at the end of every epoch (mean ± sd [range] over the seeds)\n")
    print(epoch_table(rows))
    print(f"\n(total {time.perf_counter() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "targets": args.targets,
                                         "seeds": args.seeds, "epochs": args.epochs,
                                         "snapshot_every": every, "environment": env_info,
                                         "samples_per_s": rates, "runs": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
