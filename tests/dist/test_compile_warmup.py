"""--compile on a pipeline: the stages compile their blocks in the set-up, all at once, so a
slow compile never reads as a lost stage (it used to: stage k's first message came only after
every upstream stage had compiled, one after another, and again at the first evaluation)."""
import json
import os

import pytest

from launch import free_port, spawn

SLEEP_S = 4.0  # per compiled graph
TIMEOUT_S = 8  # shorter than three upstream stages' compiles one after another


MLP = ["--model", "mlp", "--num-layers", "4", "--num-hidden", "16"]
# channels-last convolutions on both sides of the stage boundary: the activation travels in
# channels-last, and the receiving stage's graphs must be compiled for those strides
CONV_NHWC = ["--model", "vgg8b", "--feat-mult", "0.0625", "--num-hidden", "32",
             "--channels-last", "--batch-size", "500"]


def _stage(rank: int, world: int, port: int, run_dir: str, out: str, model=tuple(MLP),
           sleep_s: float = SLEEP_S) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import time

    import torch

    compiled = []

    def slow_eager(gm, example_inputs):  # a compiler that takes its time, then runs eagerly
        time.sleep(sleep_s)
        compiled.append(time.monotonic())
        return gm.forward

    real = torch.compile

    def compile(fn, *args, **kw):
        kw["backend"] = slow_eager
        return real(fn, **kw)
    torch.compile = compile

    from localloss_pp.cli import build_parser
    from localloss_pp.flags import config_from_args
    from localloss_pp.pipeline.stage import StageRunner
    from localloss_pp.training import run_training
    streams = []  # when the stage began its first stream: every compile must come before
    real_stream = StageRunner.run_stream

    def run_stream(self, *a, **kw):
        streams.append(time.monotonic())
        return real_stream(self, *a, **kw)
    StageRunner.run_stream = run_stream
    args = build_parser().parse_args([
        "train", *model, "--dataset", "mnist5k", "--epochs", "1", "--run-dir", run_dir,
        "--no-progress", "--threads-per-rank", "1", "--timeout-s", str(TIMEOUT_S), "--compile"])
    result = run_training(config_from_args(args))
    with open(out, "w") as fh:
        json.dump({"graphs": len(compiled), "digest": result.digest if result else None,
                   "in_streams": sum(t > streams[0] for t in compiled)}, fh)


@pytest.mark.slow
def test_a_slow_compile_is_no_lost_stage(tmp_path):
    port = free_port()
    codes = spawn(_stage, 4, lambda r: (r, 4, port, str(tmp_path / "run"),
                                        str(tmp_path / f"out{r}.json")), 240)
    assert codes == [0, 0, 0, 0]
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(4)]
    assert all(o["graphs"] >= 2 for o in outs), outs  # every stage compiled (slowly)
    assert outs[3]["digest"]
    assert all(o["in_streams"] == 0 for o in outs), outs


@pytest.mark.slow
def test_channels_last_activations_are_compiled_for_in_the_set_up(tmp_path):
    port = free_port()
    codes = spawn(_stage, 2, lambda r: (r, 2, port, str(tmp_path / "run"),
                                        str(tmp_path / f"out{r}.json"), CONV_NHWC, 0.0), 240)
    assert codes == [0, 0]
    outs = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert all(o["graphs"] >= 2 for o in outs) and outs[1]["digest"], outs
    # no graph compiled inside a batch (a recompile for the strides of the received
    # channels-last activation would be one)
    assert [o["in_streams"] for o in outs] == [0, 0], outs
