"""Every backprop pipeline schedule of torch.distributed.pipelining that the throughput benchmark
runs with virtual stages: a smoke run each (a tiny mlp, 2 ranks over gloo, a few steps), and the
row that says why when a schedule cannot run in a configuration."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.throughput import VIRTUAL_VARIANTS, _virtual_counts, _why

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.parametrize("variant", VIRTUAL_VARIANTS)
def test_each_virtual_stage_schedule_trains_on_two_ranks(tmp_path, variant):
    spec = {"model": {"name": "mlp", "num_layers": 3, "num_hidden": 32, "dropout": 0.0},
            "batch_size": 16, "warmup": 1, "batches": 2, "microbatches": 4, "device": "cpu",
            "loss": {"loss_sup": "predsim"}, "threads": 1, "precision": "fp32",
            "counts": [2, 1], "vcounts": _virtual_counts(4, 4), "variant": variant}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "benchmarks.worker",
                           str(tmp_path / "spec.json"), str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert len(ranks[0]["timestamps"]) == 2 and ranks[0]["bytes_per_batch"] > 0
    assert ranks[1]["timestamps"] is None  # rank 0 reports


def test_virtual_counts_are_contiguous_and_balanced():
    assert _virtual_counts(4, 4) == [1, 1, 1, 1]
    assert _virtual_counts(7, 4) == [2, 2, 2, 1]
    assert _virtual_counts(3, 4) == []  # fewer units than virtual stages: the worker says so


def test_a_schedule_that_cannot_run_gets_a_row_that_says_why(tmp_path):
    # mlp3x1024 has 4 units (3 blocks, the output layer); 3 ranks x 2 virtual stages need 6
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--models", "mlp",
                           "--losses", "predsim", "--stages", "3", "--variants", "local,i1f1b",
                           "--batch-size", "96", "--batches", "3", "--warmup", "1", "--windows",
                           "1", "--repeats", "1", "--no-costmodel", "--device", "cpu", "--json",
                           str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["local"]["samples_per_s"] > 0
    assert rows["i1f1b"]["error"] == ("ValueError: 6 virtual stages need at least 6 units; the "
                                      "model has 4 (blocks and output layer)")
    assert "| (g) backprop Interleaved1F1B | 3x" in proc.stdout and "not run: ValueError" in \
        proc.stdout


def test_the_reason_is_the_first_python_error_of_the_launch():
    err = RuntimeError("variant zbv failed (exit 1):\n[rank1]: Traceback (most recent call last)"
                       ":\n[rank1]:   File \"x.py\", line 3\n[rank1]: ValueError: M must be >= 2S"
                       "\n[rank0]: RuntimeError: other\nE1203 failed")
    assert _why(err) == "ValueError: M must be >= 2S"
