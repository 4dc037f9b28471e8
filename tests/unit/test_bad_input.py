"""Every kind of bad input: a one-line error, a non-zero exit, no traceback, nothing damaged.

Rows that need several processes (more stages than blocks, a partition that does not fit, a
non-pipelinable mode on several stages, stages with different configs) are in
tests/dist/test_pipeline.py."""
import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import pytest
import torch

from localloss_pp.run.checkpoint import latest_checkpoint, read_manifest
from localloss_pp.cli import main
from runargs import mlp_args

TINY = mlp_args(2, 32)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run)]) == 0
    return run


def snapshot(root: Path) -> dict:
    # the run directory's .lock records its last holder (host, pid): not part of the run
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file() and p.name != ".lock"}


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


def a_file(run):
    (run.parent / "afile").write_text("not a directory")


def mnist_files(damage):
    """DIR/mn/MNIST/raw with small MNIST-format files (.gz and decompressed), one of them
    damaged by `damage`."""
    def make(run):
        raw = run.parent / "mn" / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for split, n in (("train", 30), ("t10k", 12)):
            for kind, magic, shape in (("images", 2051, (n, 28, 28)), ("labels", 2049, (n,))):
                data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in shape)
                data += bytes(n * (784 if kind == "images" else 1))
                name = f"{split}-{kind}-idx{len(shape)}-ubyte"
                (raw / name).write_bytes(data)
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
        damage(raw)
    return make


def truncated_gz(raw):  # not decompressed yet, and its download was cut short
    (raw / "train-images-idx3-ubyte").unlink()
    f = raw / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:60])


def empty_gz(raw):
    (raw / "train-labels-idx1-ubyte").unlink()
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b""))


def truncated_raw(raw):
    f = raw / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:5000])


def bad_magic(raw):
    f = raw / "t10k-labels-idx1-ubyte"
    f.write_bytes(b"\x00\x00\x09\x01" + f.read_bytes()[4:])


def idx(raw, name, dims, data):
    """Write the decompressed MNIST-format file `name` with header sizes `dims`."""
    (raw / name).write_bytes(struct.pack(">I", 2048 + len(dims))
                             + b"".join(struct.pack(">I", d) for d in dims) + bytes(data))


def fewer_labels(raw):  # a consistent file, but one label short of the images
    idx(raw, "train-labels-idx1-ubyte", (29,), [0] * 29)


def label_out_of_range(raw):
    idx(raw, "train-labels-idx1-ubyte", (30,), [0] * 17 + [200] + [0] * 12)


def flat_images(raw):
    idx(raw, "t10k-images-idx3-ubyte", (12 * 784,), [0] * (12 * 784))


def latin1_toml(run):
    (run.parent / "bad.toml").write_bytes('[model]\nname = "mlp"  # café\n'.encode("latin-1"))


def damaged_metrics(run):
    f = run / "metrics.jsonl"
    f.write_text('{"epoch": 1, "tr\n')


def edit_manifest(old, new):
    """Change one field of the checkpoint's manifest, leaving it valid JSON."""
    def make(run):
        f = ckpt(run) / "manifest.json"
        text = f.read_text()
        assert old in text
        f.write_text(text.replace(old, new))
    return make


def lost_metrics_line(run):
    f = run / "metrics.jsonl"
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:-1]))


def flipped_weight(run):
    """One bit of one weight of model.pt flipped; the file stays a loadable torch file."""
    state = torch.load(run / "model.pt", weights_only=True)
    w = state["units"][0]["encoder.weight"]
    w.view(torch.int32).view(-1)[7] ^= 1 << 3
    torch.save(state, run / "model.pt")


MNIST = ["--dataset", "MNIST", "--data-dir", "DIR/mn"]
FIX = "delete it and run with --download"

ROWS = [
    # (id, prepare, argv (RUN = the good run, NEW = a fresh run dir, DIR = its parent), code, message)
    ("unknown-model", None, ["--model", "alexnet"], 2, "unknown model 'alexnet'"),
    ("vit-name", None, ["--model", "vit-6"], 2,
     "model 'vit-6': a ViT is named vit-<depth>-<dim>[-p<patch>][-h<heads>][-m<mlp ratio>]"),
    ("vit-heads", None, ["--model", "vit-2-30-h4"], 2,
     "dim 30 is not divisible by 4 heads"),
    ("vit-patch", None, ["--model", "vit-2-32-p5"], 2,
     "vit-2-32-p5: patch 5 does not tile the 28x28 input"),
    ("vit-recon", None, ["--model", "vit-nano", "--loss-unsup", "recon"], 2,
     "--loss-unsup recon is not available for ViT models"),
    ("unknown-dataset", None, ["--dataset", "CIFAR11"], 2, "unknown dataset"),
    ("unknown-loss", None, ["--loss-sup", "mse"], 2, "unknown local objective 'mse' (--loss-sup)"),
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
    ("run-dir-is-a-file", a_file, ["--run-dir", "DIR/afile"], 2,
     "run directory DIR/afile is an existing file"),
    ("run-dir-under-a-file", a_file, ["--run-dir", "DIR/afile/run"], 2,
     "run directory DIR/afile/run cannot be created: a part of its path is a file"),
    ("truncated-gz", mnist_files(truncated_gz), MNIST, 2,
     "dataset file DIR/mn/MNIST/raw/train-images-idx3-ubyte.gz is damaged or incomplete"),
    ("empty-gz", mnist_files(empty_gz), MNIST, 2,
     "dataset file DIR/mn/MNIST/raw/train-labels-idx1-ubyte.gz is damaged or incomplete"),
    ("truncated-raw", mnist_files(truncated_raw), MNIST, 2,
     "dataset file DIR/mn/MNIST/raw/train-images-idx3-ubyte is incomplete (its header says "
     "30x28x28"),
    ("bad-magic", mnist_files(bad_magic), MNIST, 2,
     "dataset file DIR/mn/MNIST/raw/t10k-labels-idx1-ubyte is damaged (bad magic number "
     "00000901"),
    ("labels-fewer-than-images", mnist_files(fewer_labels), MNIST, 2,
     "dataset files train-images-idx3-ubyte and train-labels-idx1-ubyte in DIR/mn/MNIST/raw "
     "disagree: 30 images but 29 labels"),
    ("label-out-of-range", mnist_files(label_out_of_range), MNIST, 2,
     "dataset file DIR/mn/MNIST/raw/train-labels-idx1-ubyte is damaged (label 200 at position "
     "17; this dataset has classes 0 to 9)"),
    ("images-one-dimension", mnist_files(flat_images), MNIST, 2,
     "dataset file DIR/mn/MNIST/raw/t10k-images-idx3-ubyte is damaged (its header says 9408; "
     "images of this dataset are N x 28 x 28)"),
    ("toml-not-utf8", latin1_toml, ["--config", "DIR/bad.toml"], 2,
     "config file DIR/bad.toml is not UTF-8 text"),
    ("metrics-damaged", damaged_metrics, ["--run-dir", "RUN", "--resume", "auto"], 2,
     "RUN/metrics.jsonl line 1 is damaged"),
    ("manifest-epoch-edited", edit_manifest('"epoch": 1,', '"epoch": 2,'),
     ["--resume", "RUN/checkpoints/e00001-end"], 2,
     "RUN/checkpoints/e00001-end/manifest.json is damaged (its checksum does not match"),
    ("manifest-step-edited", edit_manifest('"step": null', '"step": 17'),
     ["--run-dir", "RUN", "--resume", "auto"], 2, "no complete, intact checkpoint"),
    ("metrics-record-missing", lost_metrics_line, ["--run-dir", "RUN", "--resume", "auto"], 2,
     "RUN/metrics.jsonl has no record of epoch 1, which the run resumed at epoch 2 must keep "
     "(nothing was changed)"),
    ("model-bit-flipped", flipped_weight, ["--resume", "RUN/model.pt"], 2,
     "RUN/model.pt is damaged: its weights do not have the digest they were saved with"),
    ("config-is-a-directory", None, ["--config", "DIR"], 2,
     "config file DIR is a directory; pass a .toml file to --config"),
    ("config-dev-null", None, ["--config", "/dev/null"], 2,
     "config file /dev/null is not a regular file"),
    ("data-dir-is-a-file", a_file, ["--dataset", "MNIST", "--data-dir", "DIR/afile"], 2,
     "--data-dir DIR/afile is a file, not a folder"),
    ("tensorboard-is-a-file", a_file, ["--tensorboard", "DIR/afile/tb"], 2,
     "--tensorboard DIR/afile/tb: DIR/afile is a file, not a folder"),
    ("classes-per-batch-over", None, ["--classes-per-batch", "11"], 2,
     "--classes-per-batch 11: mnist5k has only 10 classes"),
    ("profile-past-epoch-end", None, ["--profile", "1:100:3"], 2,
     "--profile 1:100:3: an epoch has 32 training batches, fewer than START + STEPS = 103"),
    ("snapshot-every-negative", None, ["--snapshot-every", "-1"], 2,
     "--snapshot-every must be >= 0 (0 = no snapshots), got -1"),
    ("log-every-without-tensorboard", None, ["--log-every", "5"], 2,
     "--log-every writes TensorBoard scalars: add --tensorboard"),
    ("profile-spec", None, ["--profile", "1:x:3"], 2, "--profile 1:x:3: give EPOCH:START:STEPS"),
    ("profile-range", None, ["--profile", "0:1:3"], 2, "EPOCH >= 1, START >= 0 and STEPS >= 1"),
    ("model-other-width", None, ["--num-hidden", "48", "--resume", "RUN/model.pt"], 2,
     "RUN/model.pt does not fit unit 0 (LocalLinearBlock Linear(784->48)): encoder.weight has "
     "shape [32, 784] in the file but [48, 784] in this model"),
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
    message = message.replace("RUN", str(run)).replace("DIR", str(tmp_path))
    assert len(errors) == 1 and message in errors[0], err
    if "damaged" in message and "dataset" in message:
        assert FIX in errors[0]
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


@pytest.mark.parametrize("spec,message", [
    ("after-everything", "unknown fault point 'after-everything'; the points are: setup,"),
    ("mid-epoch:batch=3", "'batch=3' in 'mid-epoch:batch=3' is not one of epoch=N, step=N"),
    ("during-eval:epoch=two", "epoch must be an integer in 'during-eval:epoch=two'")])
def test_malformed_fault_spec_is_one_line(tmp_path, capsys, monkeypatch, spec, message):
    monkeypatch.setenv("LOCALLOSS_PP_FAULT", spec)
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"LOCALLOSS_PP_FAULT: {message}" in err, err
    assert not (tmp_path / "r").exists()
