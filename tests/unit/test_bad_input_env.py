"""Bad input from outside the config: a user's model module, a full or read-only disk, a
mistyped flag. Each is one line, a non-zero exit, no traceback; what was finished is kept."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from localloss_pp.cli import main
from localloss_pp.run.checkpoint import latest_checkpoint
from runargs import mlp_args

ROOT = Path(__file__).resolve().parents[2]
TINY = mlp_args(2, 32, one_thread=True)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("localloss-pp")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_mistyped_flag_is_one_line_not_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "three"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("localloss-pp train: error: argument --epochs: invalid int value: 'three' "
                   "(see localloss-pp train --help)")


MODULES = {
    "exits": ("import sys\nsys.exit(3)\n",
              "--model-module {m}: importing it called sys.exit(3)"),
    "keyerror": ("from localloss_pp.models import register_model\n"
                 "@register_model('broken')\n"
                 "def build(model, loss, input_shape, num_classes, seed):\n"
                 "    return {}['hidden_size']\n",
                 "model broken: its builder {m}.build failed (KeyError: 'hidden_size')"),
    "widths": ("import examples.custom_model as c\n"
               "from localloss_pp.models import register_model, LocalLinearBlock\n"
               "@register_model('misfit')\n"
               "def build(model, loss, input_shape, num_classes, seed):\n"
               "    units, out = c.build(model, loss, input_shape, num_classes, seed)\n"
               "    common = dict(batch_norm=False, seed=seed, num_classes=num_classes, "
               "loss=loss, dropout=0.0, nonlin='relu', first_layer=False)\n"
               "    units[1] = LocalLinearBlock(model.num_hidden + 1, model.num_hidden, "
               "index=1, **common)\n"
               "    return units, out\n",
               "model misfit: block 2 (LocalLinearBlock) failed on the previous unit's output "
               "of shape [32] per example"),
}


@pytest.mark.parametrize("kind", MODULES)
def test_a_broken_model_module_is_one_line(tmp_path, monkeypatch, capsys, kind):
    source, message = MODULES[kind]
    name = f"user_models_{kind}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(ROOT))
    model = {"exits": "mlp", "keyerror": "broken", "widths": "misfit"}[kind]
    argv = ["train", *TINY, "--model-module", name, "--model", model, "--epochs", "1",
            "--run-dir", str(tmp_path / "run")]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message.format(m=name) in line, line
    assert not (tmp_path / "run").exists()


def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs a private mount namespace "
                                 "(unshare -m, as root) to mount a small or read-only disk")


def in_small_disk(tmp_path, size: str, argv: list[str], readonly=False):
    """Run the command line with its run directory on a fresh tmpfs of `size` (read-only when
    asked) in a private mount namespace; the run directory is copied to tmp_path/out after."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cmd = " ".join([sys.executable, "-m", "localloss_pp", "train", *argv, "--run-dir",
                    str(disk / "run")])
    script = (f"mount -t tmpfs -o size={size} none {disk} || exit 99; "
              + (f"mount -o remount,ro {disk} || exit 99; " if readonly else "")
              + f"{cmd}; rc=$?; cp -a {disk}/. {tmp_path}/out 2>/dev/null; exit $rc")
    (tmp_path / "out").mkdir()
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                      "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@needs_mount
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_finished_epoch(tmp_path):
    """2 x 128 mlp: one checkpoint (weights and Adam state) takes about 1.5 MB, so the second
    epoch's does not fit on a 3 MiB disk beside the first."""
    r = in_small_disk(tmp_path, "3m", [*TINY, "--num-hidden", "128", "--epochs", "3"])
    assert r.returncode == 1, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "No space left on device (" in line and "/checkpoints/e0000" in line, line
    assert "free space on that file system" in line and "--resume auto" in line
    run = tmp_path / "out" / "run"
    folder, manifest = latest_checkpoint(run)  # the finished epoch, intact
    assert folder.name == "e00001-end" and manifest["complete_epochs"] == 1
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


@needs_mount
def test_a_read_only_run_dir_is_called_read_only(tmp_path):
    r = in_small_disk(tmp_path, "1m", [*TINY, "--epochs", "1"], readonly=True)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "read-only file system" in line and "permissions" not in line, line
