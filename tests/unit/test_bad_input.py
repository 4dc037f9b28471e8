"""Every kind of bad input: a one-line error, a non-zero exit, no traceback, nothing damaged.

Rows that need several processes (more stages than blocks, a partition that does not fit, a
non-pipelinable mode on several stages, stages with different configs) are in
tests/dist/test_pipeline.py."""
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from localloss_pp.checkpoint import latest_checkpoint, read_manifest
from localloss_pp.cli import main

TINY = ["--model", "mlp", "--dataset", "mnist5k", "--num-layers", "2", "--num-hidden", "32",
        "--no-progress", "--no-print-stats"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


def snapshot(root: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def ckpt(run: Path) -> Path:
    return run / "checkpoints" / "e00001-end"


def corrupt(run):
    f = ckpt(run) / "stage0.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def truncate(run):
    f = ckpt(run) / "stage0.pt"
    f.write_bytes(f.read_bytes()[:100])


def foreign_manifest(run):
    (run.parent / "foreign").mkdir()
    (run.parent / "foreign" / "manifest.json").write_text('{"hello": 1}')


def foreign_model(run):
    torch.save({"weights": torch.zeros(3)}, run.parent / "foreign.pt")


def text_model(run):
    (run.parent / "text.pt").write_text("not a model")


def toml(text):
    def make(run):
        (run.parent / "bad.toml").write_text(text)
    return make


ROWS = [
    # (id, prepare, argv (RUN = the good run, NEW = a fresh run dir, DIR = its parent), code, message)
    ("unknown-model", None, ["--model", "alexnet"], 2, "unknown model 'alexnet'"),
    ("unknown-dataset", None, ["--dataset", "CIFAR11"], 2, "unknown dataset"),
    ("unknown-loss", None, ["--loss-sup", "mse"], 2, "unknown supervised loss"),
    ("unknown-optimizer", None, ["--optim", "lamb"], 2, "unknown optimizer"),
    ("unknown-nonlin", None, ["--nonlin", "gelu"], 2, "unknown nonlinearity"),
    ("lr", None, ["--lr", "0"], 2, "--lr must be > 0"),
    ("dropout", None, ["--dropout", "1.0"], 2, "--dropout must be in [0, 1)"),
    ("beta", None, ["--beta", "1.5"], 2, "--beta must be in [0, 1]"),
    ("alpha", None, ["--alpha", "-0.5"], 2, "--alpha must be in [0, 1]"),
    ("batch-size", None, ["--batch-size", "0"], 2, "--batch-size must be >= 1"),
    ("num-workers", None, ["--num-workers", "some"], 2,
     "--num-workers must be 'auto' or a count >= 0, got 'some'"),
    ("toml-num-workers", toml("[data]\nnum_workers = 1.5\n"), ["--config", "DIR/bad.toml"], 2,
     '[data] num_workers must be "auto" or an integer'),
    ("milestones", None, ["--lr-decay-milestones", "5", "3"], 2, "strictly increasing"),
    ("toml-unknown-key", toml("[model]\nwidth = 3\n"), ["--config", "DIR/bad.toml"], 2,
     "unknown key 'width'"),
    ("toml-wrong-type", toml('[optim]\nlr = "fast"\n'), ["--config", "DIR/bad.toml"], 2,
     "[optim] lr must be float"),
    ("missing-dataset", None, ["--dataset", "CIFAR10", "--data-dir", "DIR/nothing"], 2,
     "pass --download"),
    ("resume-missing", None, ["--resume", "DIR/nope"], 2, "does not exist"),
    ("corrupt-checkpoint", corrupt, ["--resume", "RUN/checkpoints/e00001-end"], 2,
     "damaged (checksum mismatch)"),
    ("truncated-checkpoint", truncate, ["--resume", "RUN/checkpoints/e00001-end"], 2,
     "damaged (checksum mismatch)"),
    ("damaged-only-checkpoint", truncate, ["--run-dir", "RUN", "--resume", "auto"], 2,
     "no complete, intact checkpoint"),
    ("foreign-manifest", foreign_manifest, ["--resume", "DIR/foreign"], 2,
     "not a localloss-pp checkpoint manifest"),
    ("foreign-model", foreign_model, ["--resume", "DIR/foreign.pt"], 2,
     "not a localloss-pp model file"),
    ("text-model", text_model, ["--resume", "DIR/text.pt"], 2, "not a readable"),
    ("other-config", None, ["--num-hidden", "48", "--resume", "RUN/checkpoints/e00001-end"], 2,
     "written with another config (model.num_hidden: checkpoint 32, now 48)"),
    ("run-dir-taken", None, ["--run-dir", "RUN"], 2, "already holds a run"),
    ("precision", None, ["--precision", "fp16"], 2, "--precision must be fp32 or bf16"),
    ("bf16-backprop", None, ["--backprop", "--precision", "bf16"], 2,
     "apply to local training"),
    ("replicas-zero", None, ["--replicas", "0"], 2, "--replicas must be >= 1"),
    ("replicas-world", None, ["--replicas", "2"], 2,
     "needs a world size that is a multiple of 2"),
]


@pytest.mark.parametrize("prepare,argv,code,message", [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])
def test_bad_input(good_run, tmp_path, capsys, prepare, argv, code, message):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    if prepare:
        prepare(run)
    before = snapshot(tmp_path)
    subst = [a.replace("RUN", str(run)).replace("DIR", str(tmp_path)) for a in argv]
    if "--run-dir" not in subst:
        subst += ["--run-dir", str(tmp_path / "new")]
    assert main(["train", *TINY, "--epochs", "2", *subst]) == code
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("localloss-pp train: error")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # nothing written, nothing damaged
    assert not (tmp_path / "new").exists()


def test_non_finite_loss_stops_names_the_block_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    # epoch 1 trains normally; from epoch 2 the lr is multiplied by 1e30
    code = main(["train", *TINY, "--epochs", "2", "--run-dir", str(run), "--lr-decay-milestones",
                 "1", "--lr-decay-fact", "1e30"])
    err = capsys.readouterr().err
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "non-finite loss" in line and "stage 1/1" in line and "of epoch 2" in line
    assert "block" in line or "output layer" in line
    folder, manifest = latest_checkpoint(run)
    assert folder.name == "e00001-end" and read_manifest(folder)["complete_epochs"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
