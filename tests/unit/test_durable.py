"""What a run writes is durable: files fsynced, and their directories after a rename or a
create (so that a crash of the machine, not only of the process, keeps a finished epoch);
model.pt verified against its digest wherever it is read."""
import os
import shutil

import torch

from localloss_pp.cli import main
from localloss_pp.observe.metrics import append_jsonl
from localloss_pp.run.checkpoint import atomic_write_bytes
from runargs import mlp_args

TINY = mlp_args(2, 16, one_thread=True)


def spy_fsync(monkeypatch) -> list[str]:
    """The paths (files and directories) that os.fsync is called on, in order."""
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_atomic_write_syncs_the_file_then_its_directories(tmp_path, monkeypatch):
    synced = spy_fsync(monkeypatch)
    target = tmp_path / "new" / "folder" / "file.bin"
    atomic_write_bytes(target, b"data")
    assert target.read_bytes() == b"data"
    # the created folders in their parents, the temporary file's data, then the renamed name
    assert str(tmp_path) in synced and str(tmp_path / "new") in synced
    assert any(p.startswith(str(target.parent / ".file.bin.")) for p in synced)
    assert synced[-1] == str(target.parent)


def test_metrics_records_are_fsynced(tmp_path, monkeypatch):
    synced = spy_fsync(monkeypatch)
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 1})
    append_jsonl(path, {"epoch": 2})
    assert synced == [str(path), str(tmp_path), str(path)]  # the new file's entry once


def test_compare_computes_digests_and_refuses_a_damaged_model(tmp_path, capsys):
    a = tmp_path / "a"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(a)]) == 0
    b = tmp_path / "b"
    shutil.copytree(a, b)
    state = torch.load(b / "model.pt", weights_only=True)
    state["units"][1]["encoder.weight"].view(torch.int32).view(-1)[3] ^= 1  # one bit
    torch.save(state, b / "model.pt")
    capsys.readouterr()
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{b / 'model.pt'} is damaged" in err, err
    shutil.copy(a / "model.pt", b / "model.pt")
    assert main(["compare", str(a), str(b)]) == 0
    assert "model-digests: identical" in capsys.readouterr().out
