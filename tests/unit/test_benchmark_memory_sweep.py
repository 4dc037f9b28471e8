"""The activation-memory sweep of the throughput benchmark (--memory-sweep): the local pipeline
streams batches of a fixed size whatever M, the backprop schedules hold M micro-batches of it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.options import parse_args
from benchmarks.sweep import sweep_markdown

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_local_pipeline_is_flat_in_m_and_gpipe_grows(tmp_path):
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--models", "mlp",
                           "--losses", "predsim", "--stages", "2", "--variants", "local,gpipe",
                           "--device", "cpu", "--memory-sweep", "1,2", "--memory-only",
                           "--memory-microbatch-size", "4", "--json", str(out),
                           "--memory-plot", str(png)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads(out.read_text())["memory_sweep"]
    assert sweep["microbatches"] == [1, 2] and sweep["micro_batch_size"] == 4
    rows = {(r["variant"], r["microbatches"]): r for r in sweep["rows"]}
    assert set(rows) == {(v, M) for v in ("local", "gpipe") for M in (1, 2)}
    assert rows["local", 1]["batch_size"] == rows["local", 2]["batch_size"] == 4
    assert rows["gpipe", 2]["batch_size"] == 8
    local = [rows["local", M]["activation_memory_bytes_max"] for M in (1, 2)]
    gpipe = [rows["gpipe", M]["activation_memory_bytes_max"] for M in (1, 2)]
    assert local[0] == local[1] > 0  # measured at both M: the same stream of batches
    assert gpipe[1] > gpipe[0] > 0  # two micro-batches' activations and receive buffers
    assert all(r["buffers_measured"] for r in sweep["rows"])
    assert "| M=1 | M=2 |" in proc.stdout and "(e) backprop GPipe" in proc.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_point_that_did_not_run_says_why_in_the_table():
    ok = {"model": "m", "loss": "-", "precision": "fp32", "variant": "1f1b",
          "activation_memory_bytes_max": 3 * 2 ** 20, "buffers_measured": False}
    rows = [dict(ok, microbatches=1, error="ValueError: M must be >= S"),
            dict(ok, microbatches=2)]
    table = sweep_markdown(rows, [1, 2, 4])
    line = table.splitlines()[-1]
    assert line == ("| m | - | fp32 | (f) backprop 1F1B | not run: ValueError: M must be >= S | "
                    "3.00* | not run: no result |")


@pytest.mark.parametrize("argv, message", [
    (["--memory-sweep", "0,2"], "micro-batch counts >= 1"),
    (["--memory-sweep", "a"], "micro-batch counts >= 1"),
    (["--memory-plot", "x.png"], "go with --memory-sweep"),
    (["--memory-only"], "go with --memory-sweep"),
    (["--memory-sweep", "1,2", "--stages", "1", "--variants", "local"], "--stages 2 or more"),
])
def test_bad_sweep_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu"] + argv)
    assert message in capsys.readouterr().err


def test_the_sweep_micro_batch_defaults_to_batch_over_microbatches():
    args = parse_args(["--device", "cpu", "--memory-sweep", "4,1,2,2"])
    assert args.sweep == [1, 2, 4] and args.sweep_microbatch == 128 // 4
