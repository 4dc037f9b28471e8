"""The benchmark suite runs end to end (no speed is asserted: these machines are noisy)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_benchmark_runs_every_variant(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--quick", "--batches",
                           "12", "--warmup", "3", "--windows", "3", "--json", str(out),
                           "--plot", str(tmp_path / "bench.png")], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["cores"] and "torch" in data["environment"]
    variants = {r["variant"] for r in data["results"]}
    assert variants == {"local", "local1", "backprop1", "ddp", "gpipe", "1f1b", "i1f1b", "zb1p"}
    assert data["matmul_peak_flops"]["fp32"] > 1e8
    for r in data["results"]:
        assert r["samples_per_s"] > 0 and all(m > 0 for m in r["peak_memory_mb"])
        assert 0 < r["mfu"] < 2 and r["flop_per_s_per_rank"] > 0
    assert "MFU" in proc.stdout and "What the projection models" in proc.stdout
    local = next(r for r in data["results"] if r["variant"] == "local")
    assert 0 < local["pipeline_efficiency"] and len(local["stages"]) == 2
    assert [c["stages"] for c in data["costmodel"]] == [1, 2]
    # the 2-stage check is the local pipeline's configuration: its run is reused, not repeated
    assert data["costmodel"][1]["counts"] == local["counts"]
    assert data["costmodel"][1]["measured"] == local["samples_per_s"]
    assert "cost-model check, 2 stage(s): the local pipeline's run above" in proc.stdout
    assert data["projection"][0]["rows"]
    assert "## Cost model vs measurement" in proc.stdout and "PROJECTION" in proc.stdout
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_each_precision_is_measured_against_the_peak_of_its_arithmetic(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--models", "mlp",
                           "--losses", "predsim", "--stages", "1", "--variants",
                           "local,backprop1", "--precision", "fp32,bf16", "--batches", "6",
                           "--warmup", "2", "--windows", "2", "--repeats", "1",
                           "--no-costmodel", "--device", "cpu", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["matmul_peak_flops"]) == {"fp32", "bf16"}
    rows = {(r["precision"], r["variant"]): r for r in data["results"]}
    assert set(rows) == {(p, v) for p in ("fp32", "bf16") for v in ("local", "backprop1")}
    for (precision, _), r in rows.items():
        assert r["peak_arithmetic"] == precision and 0 < r["mfu"] < 2
    assert "| mlp3x1024 | predsim | bf16 |" in proc.stdout and "(bf16)" in proc.stdout


@pytest.mark.slow
def test_loader_benchmark_measures_every_data_path(tmp_path):
    out = tmp_path / "loader.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--batches", "9",
                           "--batch-size", "32", "--json", str(out), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    paths = {(r["dataset"], r["path"]) for r in rows}
    assert ("mnist5k", "in-memory, batched") in paths
    assert ("mnist5k", "per image (PIL), 0 workers") in paths
    assert any(d == "ImageNet-like" for d, _ in paths)
    assert all(r["batches_per_s"] > 0 for r in rows)
    assert any(r.get("demand_samples_per_s") for r in rows)
    assert "loader / pipeline demand" in proc.stdout


@pytest.mark.slow
def test_timelines_of_the_local_pipeline_gpipe_and_1f1b(tmp_path):
    out = tmp_path / "timelines.png"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--timeline", str(out),
                           "--models", "mlp", "--losses", "predsim", "--batches", "6",
                           "--warmup", "2", "--timeline-batches", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "mlp3x1024 gpipe: tracing 2 batches" in proc.stdout


def test_gpu_check_preflight_names_what_is_missing_in_one_line(monkeypatch, capsys):
    import importlib.util

    from benchmarks import preflight
    assert preflight.main() == 0  # this machine has everything
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("mlxtend", "PIL") else real(name, *a))
    capsys.readouterr()
    assert preflight.main() == 2
    lines = [l for l in capsys.readouterr().out.splitlines() if "missing:" in l
             and "optional" not in l]
    assert len(lines) == 1 and "PIL" in lines[0] and "mlxtend" in lines[0]
    assert "benchmarks/fetch_wheels.sh" in lines[0]


@pytest.mark.slow
def test_objectives_of_the_literature_in_local_modules(tmp_path):
    """--objectives dgl,infopro with --local-modules on resnet32: the local variants run the
    modules (split between modules), backprop runs its units; memory and FLOPs are measured
    for every row, and InfoPro's links carry the network's input."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--models", "resnet32",
                           "--resnet32-feat-mult", "0.125", "--objectives", "dgl,infopro",
                           "--local-modules", "4", "--variants", "local,local1,backprop1,ddp",
                           "--batches", "4", "--warmup", "1", "--windows", "2", "--repeats",
                           "1", "--device", "cpu", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["loss"], r["variant"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(o, v) for o in ("dgl", "infopro")
                         for v in ("local", "local1", "backprop1", "ddp")}
    for (objective, variant), r in rows.items():
        assert r["samples_per_s"] > 0 and all(m > 0 for m in r["peak_memory_mb"])
        if variant.startswith("local"):
            assert r["local_modules"] == "4" and sum(r["counts"]) == 3  # 3 modules + output
    # the network's input travels with InfoPro's activations: 784 more fp32 values a sample
    extra = rows["infopro", "local"]["bytes_per_sample"] - rows["dgl", "local"]["bytes_per_sample"]
    assert extra == pytest.approx(784 * 4)
    # the heads' FLOPs: DGL's are a few percent of the backbone's, InfoPro's decoders more
    assert rows["infopro", "local"]["flops_per_sample"] > rows["dgl", "local"]["flops_per_sample"]
    assert "no cost-model check with --local-modules" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    (["--objectives", "dgl,nope"], "--objectives: unknown nope; choose from"),
    (["--models", "resnet32", "--objectives", "dgl", "--local-modules", "99"],
     "--objectives dgl --local-modules 99 on resnet32 x0.25:"),
    (["--models", "mlp", "--objectives", "dgl", "--local-modules", "2",
      "--memory-sweep", "1,2"], "--local-modules goes with the throughput runs only"),
])
def test_bad_objective_flags_are_one_line_errors(argv, message, capsys):
    from benchmarks.options import parse_args
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_flops_count_local_modules_as_they_train():
    """count_flops counts the paper's per-layer units as the cost model does, and local
    modules (several backbone units each) by their own steps."""
    from benchmarks.common import INPUT_SHAPE, NUM_CLASSES
    from benchmarks.costmodel import count_flops, profile_blocks
    from localloss_pp.config import LossConfig, ModelConfig
    model = ModelConfig(name="resnet8", feat_mult=0.25)
    costs = profile_blocks(model, LossConfig(), INPUT_SHAPE, NUM_CLASSES, 8,
                           __import__("torch").device("cpu"), steps=0)
    paper = count_flops(model, LossConfig(), INPUT_SHAPE, NUM_CLASSES, 8)
    assert paper == (sum(c.local_flops for c in costs) / 8,
                     sum(c.backbone_flops for c in costs) / 8)
    dgl, infopro = (count_flops(model, LossConfig(loss_sup=name, local_modules="2"),
                                INPUT_SHAPE, NUM_CLASSES, 8) for name in ("dgl", "infopro"))
    # the same backbone; a module computes no input gradient inside it where the per-unit
    # count does, and its head adds little (DGL) or much (InfoPro's decoder)
    assert dgl[1] == infopro[1] == paper[1]
    assert dgl[0] != paper[0] and infopro[0] > 1.1 * dgl[0]
