"""Every backprop pipeline schedule of torch.distributed.pipelining that the throughput benchmark
runs with virtual stages: a smoke run each (a tiny mlp, 2 ranks over gloo, a few steps), with its
activation memory per rank, and the row that says why when a schedule cannot run in a
configuration."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.runs import first_error, summarise, virtual_counts
from benchmarks.schedules import VIRTUAL_VARIANTS

ROOT = Path(__file__).resolve().parents[2]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run_two_ranks(tmp_path, variant):
    spec = {"model": {"name": "mlp", "num_layers": 3, "num_hidden": 32, "dropout": 0.0},
            "batch_size": 16, "warmup": 1, "batches": 2, "microbatches": 4, "device": "cpu",
            "loss": {"loss_sup": "predsim"}, "threads": 1, "precision": "fp32",
            "counts": [2, 1], "vcounts": virtual_counts(4, 4), "variant": variant}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "benchmarks.worker",
                           str(tmp_path / "spec.json"), str(tmp_path)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return spec, [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_memory_measured(row, ranks):
    """Saved activations on every rank, receive buffers read from the objects."""
    assert row["saved_activation_bytes_max"] > 0
    assert all(b > 0 for b in row["saved_activation_bytes_per_rank"])
    assert len(row["buffer_bytes_per_rank"]) == 2 and row["buffer_bytes_max"] > 0
    assert row["buffers_measured"] is True
    assert row["activation_memory_bytes_max"] == max(
        s + b for s, b in zip(row["saved_activation_bytes_per_rank"],
                              row["buffer_bytes_per_rank"]))
    for r in ranks:
        assert r["buffer_bytes"] == sum(r["buffer_parts"].values())


@pytest.mark.slow
@pytest.mark.parametrize("variant", VIRTUAL_VARIANTS)
def test_each_virtual_stage_schedule_trains_on_two_ranks(tmp_path, variant):
    spec, ranks = _run_two_ranks(tmp_path, variant)
    assert len(ranks[0]["timestamps"]) == 2 and ranks[0]["bytes_per_batch"] > 0
    assert ranks[1]["timestamps"] is None  # rank 0 reports
    row = summarise(variant, ranks, spec, windows=1)
    _assert_memory_measured(row, ranks)
    # 4 micro-batches of 4 samples, 32 features (fp32), 4 virtual stages on 2 ranks: every
    # rank receives activations or gradients from the other rank for every micro-batch
    assert all(r["buffer_parts"]["recv"] >= 4 * 4 * 32 * 4 for r in ranks)
    # the bubble is measured on the CPU: each rank's time inside its compute calls
    assert row["bubble_how"] == "measured" and len(row["busy_fraction_per_rank"]) == 2
    assert all(0 < b <= 1 for b in row["busy_fraction_per_rank"])
    assert row["bubble_fraction"] == pytest.approx(1 - sum(row["busy_fraction_per_rank"]) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gpipe", "1f1b"])
def test_gpipe_and_1f1b_report_a_measured_bubble_and_their_memory(tmp_path, variant):
    spec, ranks = _run_two_ranks(tmp_path, variant)
    row = summarise(variant, ranks, spec, windows=1)
    _assert_memory_measured(row, ranks)
    assert row["bubble_how"] == "measured" and len(row["busy_fraction_per_rank"]) == 2
    assert all(0 < b <= 1 for b in row["busy_fraction_per_rank"])
    assert row["bubble_ideal"] == pytest.approx(1 / 5)  # (S - 1) / (M + S - 1)


@pytest.mark.slow
def test_the_local_pipeline_reports_its_activation_memory(tmp_path):
    spec, ranks = _run_two_ranks(tmp_path, "local")
    row = summarise("local", ranks, spec, windows=1)
    _assert_memory_measured(row, ranks)
    # the transport: two receive slots of a full batch (16 x 32 fp32) and their headers (int64:
    # 6 fields + 16 labels) on the second stage; the first holds its sends in flight (at most
    # queue_depth = 2 of them)
    slot = 16 * 32 * 4 + (6 + 16) * 8
    assert ranks[1]["buffer_parts"] == {"recv": 2 * slot, "send": 0}
    assert ranks[0]["buffer_parts"]["recv"] == 0
    assert 0 < ranks[0]["buffer_parts"]["send"] <= 2 * slot


def test_virtual_counts_are_contiguous_and_balanced():
    assert virtual_counts(4, 4) == [1, 1, 1, 1]
    assert virtual_counts(7, 4) == [2, 2, 2, 1]
    assert virtual_counts(3, 4) == []  # fewer units than virtual stages: the worker says so


@pytest.mark.slow
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
    assert first_error(err) == "ValueError: M must be >= 2S"


def test_ranks_sharing_a_gpu_get_not_run_rows_for_every_pipeline_schedule(monkeypatch, capsys):
    """One GPU, two ranks (the GPU check): the schedules are picked out by the benchmark itself,
    each with a row that says why, whether asked for by name or by the default suite."""
    import torch

    from benchmarks.options import parse_args
    from benchmarks.report import markdown
    from benchmarks.runs import not_run
    from benchmarks.throughput import jobs_of
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for variants in (["--variants", "local,local1,gpipe,1f1b,i1f1b,zb1p"], []):
        args = parse_args(["--device", "cuda", "--stages", "2", *variants])
        assert set(args.unrunnable) == {"gpipe", "1f1b", "i1f1b", "zb1p"}
        assert "share 1 GPU(s)" in capsys.readouterr().out
        jobs = jobs_of(args, {"name": "mlp", "num_layers": 2, "num_hidden": 16}, [1, 1], 2)
        assert {j.variant for j in jobs} == {"local", "local1"} | ({"backprop1", "ddp"}
                                                                   if not variants else set())
    row = not_run("zb1p", 2, 1, args.unrunnable["zb1p"])
    table = markdown([dict(row, model="mlp", loss="predsim", precision="fp32")])
    assert "not run: 2 ranks share 1 GPU(s)" in table


def test_every_list_of_variants_is_read_from_the_one_table():
    import torch.distributed.pipelining as pp

    from benchmarks import schedules, tta, worker
    from benchmarks.schedules import SCHEDULES
    assert schedules.VARIANTS == list(SCHEDULES)
    assert [s.letter for s in SCHEDULES.values()] == list("abcdefghijk")
    assert schedules.DEFAULT_VARIANTS == ["local", "local1", "backprop1", "ddp", "gpipe", "1f1b",
                                          "i1f1b", "zb1p"]
    assert set(schedules.PIPELINES) == {"gpipe", "1f1b", *VIRTUAL_VARIANTS}
    assert VIRTUAL_VARIANTS == ("i1f1b", "loopedbfs", "zb1p", "zbv", "dualpipev")
    for s in SCHEDULES.values():
        assert s.runner in worker.RUNNERS and s.placement in ("none", "looped", "v")
        assert s.torch_class is None or hasattr(pp, s.torch_class)
    assert schedules.LABELS["gpipe"] == "(e) backprop GPipe"
    # time to accuracy derives the curves of the default suite's pipeline schedules
    assert tta.DERIVED == ("gpipe", "1f1b", "i1f1b", "zb1p")
    assert tta.LABELS["i1f1b"] == "backprop Interleaved1F1B (derived)"


def test_one_stage_per_rank_is_the_v_equals_1_case_of_the_placement():
    from benchmarks.pipelining import Placement, unit_counts
    from benchmarks.schedules import SCHEDULES
    units = ["b0", "b1", "b2", "out"]  # 3 blocks and the output layer
    gpipe, zbv, i1f1b = SCHEDULES["gpipe"], SCHEDULES["zbv"], SCHEDULES["i1f1b"]
    counts = unit_counts({"counts": [2, 1]}, gpipe)  # the output layer joins the last stage
    assert counts == [2, 2]
    first, last = (Placement(units, counts, k, 2, gpipe) for k in (0, 1))
    assert first.units(0) == ["b0", "b1"] and last.units(1) == ["b2", "out"]
    assert (first.mine, first.first, first.last) == ([0], True, False)
    assert (first.remote_prev, first.remote_next, last.remote_prev) == ([False], [True], [True])
    v0, v1 = (Placement(units, unit_counts({"vcounts": [1] * 4}, zbv), k, 2, zbv)
              for k in (0, 1))
    assert v0.mine == [0, 3] and v0.first and v0.last  # V-shaped: rank 0 holds both ends
    assert (v0.remote_prev, v0.remote_next) == ([False, True], [True, False])
    assert v1.mine == [1, 2] and (v1.remote_prev, v1.remote_next) == ([True, False],
                                                                      [False, True])
    assert Placement(units, [1] * 4, 1, 2, i1f1b).mine == [1, 3]  # looped
    with pytest.raises(ValueError, match="6 virtual stages need at least 6 units"):
        Placement(units, [], 0, 3, i1f1b)
