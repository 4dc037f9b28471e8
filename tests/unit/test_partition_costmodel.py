import pytest

from benchmarks.costmodel import BlockCost, predict, project, stage_bytes
from benchmarks.runs import combine, summarise
from localloss_pp.pipeline.partition import Partition, balanced_split, parse_counts


@pytest.mark.parametrize("costs,stages,expected", [
    ([1, 1, 1, 1], 2, [2, 2]), ([1, 1, 1], 2, [2, 1]), ([5, 1, 1, 1], 2, [1, 3]),
    ([1, 2, 3, 4, 5], 3, [3, 1, 1]), ([1] * 7, 7, [1] * 7), ([3, 3, 2], 1, [3])])
def test_balanced_split_minimises_the_slowest_stage(costs, stages, expected):
    counts = balanced_split(costs, stages)
    assert sum(counts) == len(costs) and len(counts) == stages and min(counts) >= 1
    best = max(sum(costs[a:b]) for a, b in Partition(expected, costs, "x", "x").bounds)
    assert max(sum(costs[a:b]) for a, b in Partition(counts, costs, "x", "x").bounds) == best


def test_balanced_split_rejects_more_stages_than_blocks():
    with pytest.raises(ValueError):
        balanced_split([1, 1], 3)


@pytest.mark.parametrize("spec,message", [("1,1", "has 2 stages"), ("2,2,2", "covers 6 blocks")])
def test_parse_counts_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_counts(spec, 5, 3 if spec.count(",") == 2 else 3)


def _costs(ms, out_bytes=4096):
    blocks = [BlockCost(i, f"b{i}", t, t / 2, 1e9 * t, 5e8 * t, 1000, out_bytes)
              for i, t in enumerate(ms)]
    return blocks + [BlockCost(len(ms), "out", 1.0, 0.5, 1e6, 5e5, 10, 40)]


def test_cost_model_predicts_the_slowest_stage_or_link():
    costs = _costs([10, 10, 10, 10])
    one = predict(costs, [4], 100, link_bytes_per_s=1e9)
    assert one["batch_ms"] == pytest.approx(41.0) and one["link_ms"] == []
    two = predict(costs, [2, 2], 100, link_bytes_per_s=1e9, link_latency_s=0)
    assert two["stage_ms"] == [20, 21] and two["samples_per_s"] == pytest.approx(100 / 0.021)
    assert stage_bytes(costs, [2, 2], 100) == [409600]
    slow_link = predict(costs, [2, 2], 100, link_bytes_per_s=1e7, link_latency_s=0)
    assert slow_link["batch_ms"] == pytest.approx(40.96)  # 409,600 bytes at 10 MB/s
    shared = predict(costs, [1, 1, 1, 1], 100, link_bytes_per_s=1e12, cores=2)
    assert shared["batch_ms"] == pytest.approx(41.0 / 2)  # 4 stages on 2 cores
    with pytest.raises(ValueError):
        predict(costs, [2, 1], 100, link_bytes_per_s=1e9)


def test_projection_is_labelled_and_scales_the_local_pipeline():
    rows = project(_costs([10, 10]), 128, stages=[2, 4, 8])
    nv = [r for r in rows if r["link"].startswith("NVLink")]
    assert [r["stages"] for r in nv] == [2, 4, 8]
    assert nv[2]["local_vs_one_gpu"] == pytest.approx(4 * nv[0]["local_vs_one_gpu"])
    assert nv[0]["bubble"] == pytest.approx(1 / 5)


def test_summarise_median_windows_and_efficiency():
    stamps = [0.1 * i for i in range(21)]  # one batch of 10 every 0.1 s
    ranks = [{"rank": 0, "threads": 1, "peak_memory_bytes": 2 ** 20, "bytes_per_batch": 50,
              "times": {"busy_s": 1.0, "batches": 20, "busy_fraction": 0.5, "wait_recv_s": 0,
                        "wait_send_s": 1.0, "wall_s": 2.0}, "link_bytes_per_s": 1e9},
             {"rank": 1, "threads": 1, "peak_memory_bytes": 2 ** 21, "report": True,
              "timestamps": stamps, "times": {"busy_s": 2.0, "batches": 20,
                                              "busy_fraction": 1.0, "wait_recv_s": 0,
                                              "wait_send_s": 0, "wall_s": 2.0}}]
    spec = {"batch_size": 10, "batches": 20, "warmup": 2}
    row = summarise("local", ranks, spec, windows=4)
    assert row["samples_per_s"] == pytest.approx(100)
    assert row["pipeline_efficiency"] == pytest.approx(1.0)  # 10 batches/s x 0.1 s busy
    assert row["bubble_fraction"] == pytest.approx(0.25)
    assert row["peak_memory_mb"] == [1.0, 2.0] and row["bytes_per_sample"] == 5.0
    both = combine([row, dict(row, window_samples_per_s=[50.0] * 4, samples_per_s=50.0)])
    assert both["samples_per_s"] == pytest.approx(75) and len(both["window_samples_per_s"]) == 8


def test_auto_partition_profiles_units_as_the_run_sets_them_up(monkeypatch):
    """--partition auto times throw-away units set up like the run's own (precision,
    channels-last, compile), with inputs of the dtype they receive; it used to time fp32 eager
    NCHW units whatever the run used."""
    import torch

    from localloss_pp.config import build_config
    from localloss_pp.models.blocks import LocalBlock, OutputLayer
    from localloss_pp.pipeline.partition import profile_unit_times

    seen = []
    for cls in (LocalBlock, OutputLayer):
        real = cls.setup

        def setup(self, device, optim, _real=real, **kw):
            seen.append(kw)
            return _real(self, device, optim, **kw)
        monkeypatch.setattr(cls, "setup", setup)
    cfg = build_config(cli_values={"model": {"name": "vgg6a", "feat_mult": 0.0625,
                                             "num_hidden": 32},
                                   "data": {"dataset": "mnist5k", "batch_size": 8},
                                   "train": {"precision": "bf16", "channels_last": True}})
    times = profile_unit_times(cfg, (1, 28, 28), 10, torch.device("cpu"), steps=1)
    assert len(times) == len(seen) and all(t > 0 for t in times)
    assert all(kw.get("precision") == "bf16" and kw.get("channels_last") for kw in seen), seen
