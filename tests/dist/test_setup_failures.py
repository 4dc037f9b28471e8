"""Set-up failures outside the run's control end promptly, with one line per process."""
import socket
import subprocess
import sys
import time

import pytest

from launch import ROOT, _env
from runargs import mlp_args

ARGS = ["train", *mlp_args(2, 16, "--no-progress", "--timeout-s", "2", quiet=False,
                           one_thread=True)]


@pytest.mark.slow
def test_a_master_port_held_by_a_silent_program_fails_every_rank_within_the_timeout(tmp_path):
    """env:// launch whose MASTER_PORT belongs to a program that accepts connections and never
    answers: rank 0 cannot listen, and rank 1's store client used to wait forever (past 600 s
    with --timeout-s 5)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(0)
    port = silent.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "localloss_pp", *ARGS, "--run-dir",
                               str(tmp_path / "run")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=_env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, LOCAL_WORLD_SIZE=2,
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in (0, 1)]
    start = time.monotonic()
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
        silent.close()
    assert time.monotonic() - start < 90
    assert all(p.returncode not in (0, None) for p in procs), outs
    assert f"MASTER_PORT {port} is in use by another program" in outs[0], outs[0]
    assert f"could not join the process group at 127.0.0.1:{port} within --timeout-s 2" \
        in outs[1], outs[1]
    for out in outs:
        assert "Traceback" not in out and len([l for l in out.splitlines() if "error" in l]) == 1
    assert not (tmp_path / "run").exists()
