"""benchmarks/tta.py: time to accuracy at sub-epoch resolution (the slow test runs it on real
MNIST: one-process backprop and a 1F1B curve derived from it)."""
import json
import math

import pytest

from benchmarks import tta


def test_time_to_target_is_the_first_point_at_or_below_it():
    curve = [{"train_s": 1.0, "test_error": 9.0}, {"train_s": 2.0, "test_error": 2.5},
             {"train_s": 3.0, "test_error": 3.5}, {"train_s": 4.0, "test_error": 1.9}]
    assert tta.time_to(curve, 3.0) == 2.0
    assert tta.time_to(curve, 2.0) == 4.0
    assert tta.time_to(curve, 1.0) is None


def test_median_over_seeds_counts_a_seed_that_never_reaches_as_infinite():
    assert tta.summary([3.0, 1.0, 2.0]) == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0,
                                            "reached": 3, "seeds": 3}
    assert tta.summary([3.0, None, 1.0])["median_s"] == 3.0
    s = tta.summary([None, None, 1.0])
    assert s["median_s"] is None and s["reached"] == 1 and s["max_s"] is None
    assert tta._fmt(s) == "not reached (1/3)"
    assert tta._fmt(tta.summary([3.0, None, 1.0])) == "3.0s [1.0--] (2/3)"


@pytest.mark.parametrize("argv, message", [
    (["--variants", "local,backprop1"], "--variants: unknown ['local']"),
    (["--variants", "local-pred"], "add backprop1 to --variants, or pass --derived none"),
    (["--derived", "dualpipe"], "--derived: unknown ['dualpipe']"),
    (["--targets", "3,x"], "--targets: give comma-separated numbers"),
    (["--targets", "150"], "every value must lie in (0, 100)"),
    (["--seeds", ""], "--seeds: give at least one value"),
    (["--stages", "1"], "--stages must be >= 2, got 1"),
    (["--points-per-epoch", "0"], "--points-per-epoch must be >= 1"),
    (["--variants", "local-nope,backprop1"], "--variants: unknown ['local-nope']"),
    (["--model-args", "--model resnet20", "--variants", "backprop1"], "with --model-args pass "
     "--derived none"),
])
def test_bad_arguments_say_what_is_wrong(tmp_path, capsys, argv, message):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        tta.parse_args(["--data-dir", str(tmp_path), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tta.parse_args(["--data-dir", str(tmp_path)])
    assert "MNIST/raw not found" in capsys.readouterr().err


def test_every_variant_is_a_real_train_command(tmp_path):
    ns = type("A", (), {"dataset": "MNIST", "data_dir": "D", "epochs": 3, "stages": 2})()
    cmds = {v: tta._command(v, ns, 7, 23, tmp_path, 2) for v in tta.VARIANTS}
    assert "torch.distributed.run" in cmds["local-predsim"][0]
    assert cmds["local-predsim"][0][cmds["local-predsim"][0].index("--loss-sup") + 1] == "predsim"
    assert "--backprop" in cmds["ddp"][0] and "--replicas" in cmds["ddp"][0]
    assert "torch.distributed.run" not in cmds["backprop1"][0] and cmds["backprop1"][1] == 2
    for cmd, _ in cmds.values():
        assert cmd[cmd.index("--snapshot-every") + 1] == "23"
        assert cmd[cmd.index("--seed") + 1] == "7"


@pytest.mark.slow
@pytest.mark.timeout(900)  # 47 s on 2 quiet cores, 5-7 min on busy ones (the suite: 300 s)
def test_sub_epoch_curve_on_real_mnist(mnist_copy, tmp_path, capsys):
    out = tmp_path / "tta.json"
    assert tta.main(["--data-dir", str(mnist_copy), "--variants", "backprop1", "--derived",
                     "1f1b", "--seeds", "1", "--epochs", "1", "--json", str(out),
                     "--plot", str(tmp_path / "tta.png")]) == 0
    text = capsys.readouterr().out
    assert "| backprop, 1 process | 1x" in text and "| backprop 1F1B (derived) | 2x1 | 21 |" in text
    res = json.loads(out.read_text())
    bp, derived = res["runs"]
    curve = bp["curves"][0]
    assert len(curve) == 21 and [p["batch"] for p in curve][-2:] == [460, 469]
    assert all(a["train_s"] < b["train_s"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["test_error"] < 6 and curve[0]["test_error"] > curve[-1]["test_error"]
    assert derived["stretch"] == pytest.approx(res["samples_per_s"]["backprop1"]
                                               / res["samples_per_s"]["1f1b"])
    assert [p["train_s"] for p in derived["curves"][0]] == \
        pytest.approx([p["train_s"] * derived["stretch"] for p in curve])
    assert not math.isnan(bp["final_error"])
    assert (tmp_path / "tta.png").read_bytes()[:4] == b"\x89PNG"


def test_objectives_and_models_of_ones_choice_are_variants(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    args = tta.parse_args(["--data-dir", str(tmp_path), "--variants", "local-dgl,local1-infopro",
                           "--model-args", "--model resnet32 --feat-mult 0.25",
                           "--local-modules", "4,4,4,4", "--derived", "none"])
    cmd, threads = tta._command("local-dgl", args, 1, 23, tmp_path, 2)
    assert "torch.distributed.run" in cmd and threads == 1
    assert cmd[cmd.index("--loss-sup") + 1] == "dgl"
    assert cmd[cmd.index("--local-modules") + 1] == "4,4,4,4"
    assert cmd[cmd.index("--model") + 1] == "resnet32"
    cmd, threads = tta._command("local1-infopro", args, 1, 23, tmp_path, 2)
    assert "torch.distributed.run" not in cmd and threads == 2
    assert tta.label("local1-infopro") == "local 1 process, infopro"
    assert tta.model_name(args) == "--model resnet32 --feat-mult 0.25, --local-modules 4,4,4,4"


def _curve(errors_by_epoch, t0=0.0):
    """Two points per epoch; times 1 s apart."""
    out, t = [], t0
    for epoch, errs in enumerate(errors_by_epoch, 1):
        for i, err in enumerate(errs):
            t += 1.0
            out.append({"epoch": epoch, "batch": i + 1, "train_s": t, "test_error": err})
    return out


def test_seeds_give_final_and_per_epoch_errors_with_their_spread(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    args = tta.parse_args(["--data-dir", str(tmp_path), "--variants", "backprop1",
                           "--derived", "none", "--epochs", "2", "--targets", "3"])
    curves = [_curve([[9, 4], [3, 2]]), _curve([[8, 5], [2.5, 1]]), _curve([[7, 6], [2, 3]])]
    rows = [{"variant": "backprop1", "label": "bp", "derived": False, "ranks": 1, "threads": 2,
             "curves": curves}]
    tta._times_to_targets(rows, args, batches=10, every=5)
    r = rows[0]
    assert r["final"] == pytest.approx({"mean": 2.0, "sd": 1.0, "min": 1, "max": 3, "n": 3})
    assert [s["mean"] for s in r["per_epoch"]] == pytest.approx([5.0, 2.0])
    assert r["samples_per_s"] == pytest.approx(2 * 60000 / 4.0)
    assert "| bp | 1x2 | 2 | 2.00 ± 1.00% [1.00-3.00] | 30000 | 3.0s [3.0-3.0] |" \
        in tta.table(rows, args.targets)
    assert "| bp | 5.00 ± 1.00% [4.00-6.00] | 2.00 ± 1.00% [1.00-3.00] |" in tta.epoch_table(rows)
    t, mean, lo, hi = tta.mean_curve(curves)
    assert t == [1, 2, 3, 4] and mean[0] == 8 and lo[3] == 1 and hi[3] == 3
    tta.plot(rows, args, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
