"""Train from Python, read the result, load the trained model, evaluate and export it.

Run from the repository root: `python examples/from_python.py [WORK_DIR]` (about a minute on
two CPU cores). It pipelines an mlp over 2 stages on the embedded mnist5k dataset (the two
stage processes are started by torch's elastic launcher, as torchrun starts them), then works
with the trained model in this process. The same lines run in a notebook.
"""
import sys
from pathlib import Path

import torch

import localloss_pp as lp


def main(work: Path) -> None:
    result = lp.train(dataset="mnist5k", model="mlp", num_layers=2, num_hidden=256,
                      loss_sup="predsim", epochs=2, stages=2, run_dir=str(work / "run"),
                      progress=False, print_stats=False)
    print(f"test error {result.test_error:.2f}% (train {result.train_error:.2f}%) after "
          f"{result.epochs} epochs, {result.samples_per_s:.0f} samples/s, digest "
          f"{result.digest[:16]}")
    for record in result.records:  # one EpochRecord per epoch, as in metrics.jsonl
        print(f"  epoch {record.epoch}: test error {record.test.error:.2f}%, "
              f"{len(record.blocks)} blocks")
    assert lp.RunResult.from_dir(result.run_dir).digest == result.digest

    model = lp.load(result.run_dir)  # an nn.Module in eval mode, without the local heads
    evaluation = lp.evaluate(model)  # on the test split of the run's dataset
    print(f"loaded: test error {evaluation.error:.2f}% on {evaluation.num_examples} images "
          f"(the run said {result.test_error:.2f}%)")
    worst = min(evaluation.per_class_accuracy.items(), key=lambda kv: kv[1])
    print(f"hardest class: {worst[0]} ({worst[1]:.1f}% right)")

    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)  # raw pixels
    print("predicted classes:", model.predict(images).tolist())
    torch.save(model.state_dict(), work / "weights.pt")
    exported = torch.export.export(model, (model.preprocess(images),))
    print("exported:", type(exported).__name__)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/from-python"))
