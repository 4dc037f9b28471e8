"""--compile on a pipeline: the stages compile their blocks in the set-up, all at once, so a
slow compile never reads as a lost stage (it used to: stage k's first message came only after
every upstream stage had compiled, one after another, and again at the first evaluation)."""
import json
import os

import pytest

from launch import free_port, spawn

SLEEP_S = 4.0  # per compiled graph
TIMEOUT_S = 8  # shorter than three upstream stages' compiles one after another


def _stage(rank: int, world: int, port: int, run_dir: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import time

    import torch

    compiled = []

    def slow_eager(gm, example_inputs):  # a compiler that takes its time, then runs eagerly
        time.sleep(SLEEP_S)
        compiled.append(time.monotonic())
        return gm.forward

    real = torch.compile

    def compile(fn, *args, **kw):
        kw["backend"] = slow_eager
        return real(fn, **kw)
    torch.compile = compile

    from localloss_pp.cli import build_parser
    from localloss_pp.flags import config_from_args
    from localloss_pp.train import run_training
    args = build_parser().parse_args([
        "train", "--model", "mlp", "--dataset", "mnist5k", "--num-layers", "4",
        "--num-hidden", "16", "--epochs", "1", "--run-dir", run_dir, "--no-progress",
        "--threads-per-rank", "1", "--timeout-s", str(TIMEOUT_S), "--compile"])
    started = time.monotonic()
    result = run_training(config_from_args(args))
    with open(out, "w") as fh:
        json.dump({"graphs": len(compiled), "digest": result.digest if result else None,
                   "after_links": [t - started for t in compiled]}, fh)


@pytest.mark.slow
def test_a_slow_compile_is_no_lost_stage(tmp_path):
    port = free_port()
    codes = spawn(_stage, 4, lambda r: (r, 4, port, str(tmp_path / "run"),
                                        str(tmp_path / f"out{r}.json")), 240)
    assert codes == [0, 0, 0, 0]
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(4)]
    assert all(o["graphs"] >= 2 for o in outs), outs  # every stage compiled (slowly)
    assert outs[3]["digest"]
