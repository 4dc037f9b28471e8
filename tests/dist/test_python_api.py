"""train(stages=2) from a Python process is the torchrun command: one digest for the Python
API's pipeline, the torchrun command's and the one-process run, on a generated image folder;
the examples of docs/python.md run as written."""
import signal
import subprocess
import sys
import time

import pytest

import localloss_pp as lp
from imagefolders import make_folder
from launch import ROOT, Streamed, _env

ARGS = ["--model", "mlp", "--num-layers", "2", "--num-hidden", "16", "--epochs", "1",
        "--batch-size", "12", "--no-progress", "--no-print-stats", "--threads-per-rank", "1"]
OPTIONS = dict(model="mlp", num_layers=2, num_hidden=16, epochs=1, batch_size=12,
               progress=False, print_stats=False, threads_per_rank=1)


def test_train_with_two_stages_gives_the_digest_of_the_torchrun_command(tmp_path):
    root = make_folder(tmp_path / "pets")
    s = Streamed([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc-per-node", "2", "-m", "localloss_pp", "train", "--dataset",
                  f"folder:{root}", *ARGS, "--run-dir", str(tmp_path / "torchrun")])
    assert s.wait(240) == 0, s.text[-3000:]
    cli_digest = s.text.split("model-digest: ")[1].split()[0]
    handler = signal.getsignal(signal.SIGINT)
    piped = lp.train(dataset=f"folder:{root}", stages=2, run_dir=str(tmp_path / "api2"),
                     **OPTIONS)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    one = lp.train(dataset=f"folder:{root}", run_dir=str(tmp_path / "api1"), **OPTIONS)
    assert piped.digest == cli_digest == one.digest
    assert piped.test_error == one.test_error and len(piped.records) == 1


@pytest.mark.slow
def test_a_stage_error_is_raised_in_the_caller_with_its_line(tmp_path):
    with pytest.raises(ValueError, match="an epoch has 32 training batches, fewer than START"):
        lp.train(dataset="mnist5k", model="mlp", num_layers=2, num_hidden=16, epochs=1,
                 profile="1:100:3", stages=2, run_dir=str(tmp_path / "run"), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("script,expect", [
    ("from_python.py", "loaded: test error"),
    ("own_data.py", "test/centre/000.png is centre"),
])
def test_the_examples_run_as_written(tmp_path, script, expect):
    done = subprocess.run([sys.executable, f"examples/{script}", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expect in done.stdout


@pytest.mark.slow
def test_ctrl_c_stops_every_stage_and_leaves_a_run_that_continues(tmp_path):
    run = tmp_path / "run"
    code = ("import localloss_pp as lp; lp.train(dataset='mnist5k', model='mlp', num_layers=2, "
            f"num_hidden=32, epochs=40, stages=2, run_dir={str(run)!r}, progress=False, "
            "print_stats=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "e00001-end" / "manifest.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C or a notebook's interrupt sends
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "KeyboardInterrupt: stopped; every finished epoch is in" in err, err[-2000:]
    # no stage is left holding the run directory: it continues, here in one process
    done = max(int(p.name[1:6]) for p in (run / "checkpoints").iterdir()
               if (p / "manifest.json").exists() and p.name.endswith("-end"))
    result = lp.train(dataset="mnist5k", model="mlp", num_layers=2, num_hidden=32,
                      epochs=done + 1, run_dir=str(run), resume="auto", progress=False,
                      print_stats=False)
    assert result.epochs == done + 1 and [r.epoch for r in result.records] == \
        list(range(1, done + 2))


@pytest.mark.slow
def test_train_runs_from_a_jupyter_notebook(tmp_path):
    """A real kernel (nbclient, ipykernel): the pipelined run from a notebook cell, no
    `__main__` guard, its result and the loaded model in the next cell."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    root = make_folder(tmp_path / "pets")
    cells = [
        "import localloss_pp as lp",
        f"r = lp.train(dataset='folder:{root}', stages=2, run_dir='{tmp_path / 'run'}', "
        "model='mlp', num_layers=2, num_hidden=16, epochs=1, batch_size=12, progress=False)",
        "m = lp.load(r.run_dir)\nprint('errors', r.test_error, lp.evaluate(m).error, "
        "r.digest)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    out = "".join(o.get("text", "") for o in nb.cells[2].outputs)
    _, run_error, loaded_error, digest = out.split()
    assert float(run_error) == pytest.approx(float(loaded_error), abs=1e-9)
    assert digest == lp.RunResult.from_dir(tmp_path / "run").digest
    logs = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert "[stage 2/2] epoch 1/1" in logs  # the stages' lines reach the notebook
