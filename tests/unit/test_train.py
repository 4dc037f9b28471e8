"""End-to-end runs of the command line on the embedded data (and the real MNIST when present)."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from localloss_pp.cli import main
from localloss_pp.observe.metrics import read_jsonl
from runargs import mlp_args

SMALL = ["--num-hidden", "128"]
ROOT = Path(__file__).resolve().parents[2]


def run_cli(*argv, cwd=None):
    return subprocess.run([sys.executable, "-m", "localloss_pp", *argv], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def digest_of(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("model-digest: ")]
    assert len(lines) == 1, stdout
    return lines[0].split()[1]


@pytest.mark.slow  # (the default suite compares digests across runs in tests/dist/)
def test_same_seed_same_digest_through_the_cli(tmp_path):
    a = run_cli("train", "--epochs", "1", "--run-dir", str(tmp_path / "a"), *SMALL)
    b = run_cli("train", "--epochs", "1", "--run-dir", str(tmp_path / "b"), *SMALL)
    c = run_cli("train", "--epochs", "1", "--run-dir", str(tmp_path / "c"), "--seed", "2", *SMALL)
    assert a.returncode == 0, a.stderr
    assert digest_of(a.stdout) == digest_of(b.stdout) != digest_of(c.stdout)
    assert "[stage 1/1] epoch 1/1" in a.stderr


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    # Measured on 2 CPU cores: 6.10% test error after 5 epochs of the quick-start run (seed 1).
    assert main(["train", "--epochs", "5", "--run-dir", str(tmp_path / "r")]) == 0
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert len(records) == 5
    assert records[-1]["test"]["error"] < 9.0
    assert records[-1]["test"]["error"] < records[0]["test"]["error"]


def test_run_directory_contents(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--run-dir", str(run), "--dropout", "0.2",
                 "--cutout", "--length", "8", *SMALL]) == 0
    cfg = tomllib.loads((run / "config.toml").read_text())
    assert cfg["model"]["num_hidden"] == 128 and cfg["data"]["cutout"] is True
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    rec = records[-1]
    assert set(rec["train"]) >= {"loss_local", "loss_global", "error"}
    assert len(rec["blocks"]) == 3
    for block in rec["blocks"]:
        for split in ("train", "test"):
            assert set(block[split]) >= {"loss_sim", "loss_pred", "error"}
            assert 0 <= block[split]["error"] <= 100
    state = torch.load(run / "model.pt", weights_only=True)
    assert len(state["units"]) == 4 and len(state["digest"]) == 64
    # the same directory is never overwritten
    assert main(["train", "--epochs", "1", "--run-dir", str(run)]) == 2
    assert len(read_jsonl(run / "metrics.jsonl")) == 2
    # one permission policy: every file the run wrote has the mode the umask gives
    from localloss_pp.run.checkpoint import FILE_MODE
    modes = {p.relative_to(run): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
    assert len(modes) > 8 and set(modes.values()) == {FILE_MODE}, modes


def test_a_damaged_line_no_checkpoint_needs_does_not_block_a_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--run-dir", str(run), *SMALL]) == 0
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "train": {"loss_loc')  # a run killed while appending
    assert main(["train", "--epochs", "2", "--run-dir", str(run), "--resume", "auto",
                 *SMALL]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert f"{run / 'metrics.jsonl'} line 2 is damaged" in capsys.readouterr().err


def test_resume_continues_after_the_saved_epoch(tmp_path):
    assert main(["train", "--epochs", "1", "--run-dir", str(tmp_path / "a"), *SMALL]) == 0
    assert main(["train", "--epochs", "2", "--run-dir", str(tmp_path / "b"), "--resume",
                 str(tmp_path / "a" / "model.pt"), *SMALL]) == 0
    assert [r["epoch"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [2]
    # another architecture, a missing file, a foreign file: clear errors, nothing written
    for bad in (["--num-hidden", "64", "--resume", str(tmp_path / "a" / "model.pt")],
                ["--resume", str(tmp_path / "nope.pt")],
                ["--resume", str(tmp_path / "a" / "config.toml")]):
        assert main(["train", "--epochs", "2", "--run-dir", str(tmp_path / "c"), *bad]) == 2
        assert not (tmp_path / "c").exists()


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--run-dir", str(run), *SMALL]) == 0
    assert main(["plot", str(run), "--epochs", "1,2"]) == 0
    for name in ("test_error.png", "local_error.png", "local_error_depth.png", "stages.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run), "--epochs", "3"]) == 2  # no such epoch: one line


def test_compare_tells_what_differs(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--epochs", "1", "--run-dir", str(a), *SMALL]) == 0
    assert main(["train", "--epochs", "1", "--run-dir", str(b), *SMALL, "--lr", "1e-3"]) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "model-digests: differ" in out and "| optim.lr | 0.0005 | 0.001 |" in out
    assert f"| {a} | 1 |" in out
    assert main(["compare", str(a), str(tmp_path / "nothing")]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def test_backprop_and_sampler_modes_run(tmp_path):
    assert main(["train", "--model", "mlp", "--dataset", "mnist5k", "--epochs", "1",
                 "--backprop", "--run-dir", str(tmp_path / "bp"), *SMALL]) == 0
    rec = read_jsonl(tmp_path / "bp" / "metrics.jsonl")[0]
    assert rec["blocks"] == [] and rec["test"]["error"] < 50
    assert main(["train", "--model", "mlp", "--dataset", "mnist5k", "--epochs", "2",
                 "--classes-per-batch", "3", "--classes-per-batch-until-epoch", "1",
                 "--loss-sup", "sim", "--run-dir", str(tmp_path / "cpb"), *SMALL]) == 0
    rec = read_jsonl(tmp_path / "cpb" / "metrics.jsonl")[0]
    assert rec["blocks"][0]["train"]["error"] is None  # no pred decoder in sim mode


@pytest.mark.parametrize("argv,message", [
    (["train", "--lr", "-1"], "--lr must be > 0"),
    (["train", "--dataset", "CIFAR10", "--data-dir", "{tmp}"], "pass --download"),
    (["train", "--config", "{tmp}/missing.toml"], "does not exist"),
    (["plot", "{tmp}"], "has no metrics.jsonl"),
    (["train", "--batch-size", "3", "--run-dir", "{tmp}/r"], "holds a single example"),
    (["train", "--model", "vgg8b", "--dataset", "mnist5k", "--feat-mult", "0.001"],
     "< 1 channel"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, argv, message):
    result = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_params_command_prints_the_paper_count():
    result = run_cli("params", "--model", "vgg8b", "--dataset", "CIFAR10")
    assert result.returncode == 0
    assert "total: 8903434" in result.stdout and "2,100,224" in result.stdout


@pytest.mark.slow
def test_real_mnist_one_epoch_mlp_predsim(mnist_copy, tmp_path):
    # Measured on 2 CPU cores: 3.03% test error after one epoch (seed 1), about 30 s.
    run = tmp_path / "mnist"
    assert main(["train", "--config", str(ROOT / "configs" / "mnist_mlp_predsim_1epoch.toml"), "--data-dir",
                 str(mnist_copy), "--run-dir", str(run)]) == 0
    rec = read_jsonl(run / "metrics.jsonl")[0]
    assert rec["train"]["num_examples"] == 60000 and rec["test"]["num_examples"] == 10000
    assert rec["test"]["error"] < 4.0
    print(json.dumps(rec["test"]))


@pytest.mark.slow
def test_a_run_continued_from_another_directory_resumes_again(tmp_path):
    """A run continued from another run's checkpoint holds the records from its first epoch
    on; resuming it again must not ask for the other run's earlier records."""
    a, b = tmp_path / "a", tmp_path / "b"
    tiny = mlp_args(2, 16)
    assert main(["train", *tiny, "--epochs", "2", "--run-dir", str(a)]) == 0
    assert main(["train", *tiny, "--epochs", "2", "--run-dir", str(b), "--resume",
                 str(a / "checkpoints" / "e00001-end")]) == 0
    assert [r["epoch"] for r in read_jsonl(b / "metrics.jsonl")] == [2]
    assert main(["train", *tiny, "--epochs", "3", "--run-dir", str(b), "--resume", "auto"]) == 0
    assert [r["epoch"] for r in read_jsonl(b / "metrics.jsonl")] == [2, 3]
