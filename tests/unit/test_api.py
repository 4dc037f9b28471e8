"""The Python API in one process: train() with options, RunResult, load() to a plain
nn.Module whose test error is the run's, evaluate(), and the refusals (bad options, damaged
model files, unfinished runs, a resumed run on a changed folder)."""
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import localloss_pp as lp
from imagefolders import CLASSES, make_folder

OPTIONS = dict(model="mlp", num_layers=2, num_hidden=16, epochs=2, batch_size=12,
               augment="flip", progress=False, print_stats=False, threads_per_rank=1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("api") / "pets")
    result = lp.train(dataset=f"folder:{root}", run_dir=str(root.parent / "run"), **OPTIONS)
    return root, result


def test_train_returns_the_run_and_from_dir_reads_it_back(run):
    _, result = run
    assert isinstance(result, lp.RunResult) and result.epochs == 2
    assert [r.epoch for r in result.records] == [1, 2]
    assert result.records[-1].test.error == result.test_error
    assert result.samples_per_s > 0 and len(result.digest) == 64
    again = lp.RunResult.from_dir(result.run_dir)
    assert (again.digest, again.test_error, again.records) == \
        (result.digest, result.test_error, result.records)
    assert (result.run_dir / "dataset.json").is_file()


def test_a_loaded_model_is_a_plain_module_with_the_runs_test_error(run, tmp_path):
    _, result = run
    model = lp.load(result.run_dir)
    assert isinstance(model, nn.Module) and not model.training
    assert model.classes == list(CLASSES) and model.digest == result.digest
    evaluation = lp.evaluate(model)
    assert evaluation.error == pytest.approx(result.test_error, abs=1e-9)
    assert evaluation.num_examples == 12 and set(evaluation.per_class_accuracy) == set(CLASSES)
    assert int(evaluation.confusion.sum()) == 12
    # no local heads, unless asked; the same logits either way
    full = lp.load(result.run_dir / "model.pt", heads=True)
    n = sum(p.numel() for p in model.parameters())
    assert n < sum(p.numel() for p in full.parameters())
    x = model.preprocess(torch.randint(0, 256, (5, 3, 12, 12), dtype=torch.uint8))
    assert torch.equal(model(x), full(x))
    assert model.predict(torch.zeros(2, 3, 12, 12, dtype=torch.uint8)).shape == (2,)
    exported = torch.export.export(model, (x,))
    assert torch.allclose(exported.module()(x), model(x))
    torch.save(model, tmp_path / "whole.pt")
    assert torch.equal(torch.load(tmp_path / "whole.pt", weights_only=False)(x), model(x))


def test_a_damaged_model_file_is_refused_on_load(run, tmp_path):
    _, result = run
    copy = tmp_path / "model.pt"
    state = torch.load(result.run_dir / "model.pt", weights_only=True)
    w = state["units"][0]["encoder.weight"]
    w.view(torch.int32).view(-1)[3] ^= 1 << 4
    torch.save(state, copy)
    with pytest.raises(ValueError, match="is damaged: its weights do not have the digest"):
        lp.load(copy)


def test_options_are_checked_like_flags(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'num_layer'; did you mean num_layers"):
        lp.train(dataset="mnist5k", num_layer=2)
    with pytest.raises(ValueError, match="train\\(\\): epochs must be int, got str '3'"):
        lp.train(dataset="mnist5k", epochs="3")
    with pytest.raises(ValueError, match="--dropout must be in \\[0, 1\\)"):
        lp.train(dataset="mnist5k", dropout=1.5)
    with pytest.raises(ValueError, match="stages must be an integer >= 1"):
        lp.train(stages=0)
    with pytest.raises(ValueError, match="has no model.pt: the run has not finished"):
        lp.RunResult.from_dir(tmp_path)


def test_a_run_resumed_on_a_changed_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "pets")
    options = dict(OPTIONS, epochs=1)
    lp.train(dataset=f"folder:{root}", run_dir=str(tmp_path / "run"), **options)
    for name in ("new1.png", "new2.png"):
        shutil.copy(root / "train" / "top" / "000.png", root / "train" / "top" / name)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    options["epochs"] = 2
    with pytest.raises(ValueError, match="changed since the run in .* started"):
        lp.train(dataset=f"folder:{root}", run_dir=str(tmp_path / "run"), resume="auto",
                 **options)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_local_modules_load_without_their_auxiliary_networks(run, tmp_path):
    root, _ = run
    result = lp.train(dataset=f"folder:{root}", model="resnet20", feat_mult=0.25,
                      loss_sup="dgl", local_modules=2, epochs=1, batch_size=12,
                      augment="none", run_dir=str(tmp_path / "dgl"), progress=False,
                      print_stats=False, threads_per_rank=1)
    model, full = lp.load(result.run_dir), lp.load(result.run_dir, heads=True)
    assert all(getattr(b, "head", None) is None for b in model.blocks)
    assert sum(p.numel() for p in model.parameters()) < \
        sum(p.numel() for p in full.parameters())
    x = torch.randn(4, 3, 12, 12)
    assert torch.equal(model(x), full(x))
    assert lp.evaluate(model).error == pytest.approx(result.test_error, abs=1e-9)


def test_options_override_a_config_or_a_toml_file(tmp_path):
    from localloss_pp.api import _config_of
    f = tmp_path / "c.toml"
    f.write_text('[model]\nname = "vgg8b"\n[train]\nepochs = 7\n')
    cfg = _config_of(f, {"epochs": 3, "dataset": Path("pets"), "replicas": 2,
                         "batch_norm": False, "lr_decay_milestones": (5, 9)})
    assert (cfg.model.name, cfg.train.epochs, cfg.data.dataset, cfg.train.num_replicas) == \
        ("vgg8b", 3, "folder:pets", 2)
    assert cfg.model.batch_norm is False and cfg.optim.lr_decay_milestones == [5, 9]
    again = _config_of(cfg, {"lr": 0.1})
    assert again.train.epochs == 3 and again.optim.lr == 0.1 and again.model.name == "vgg8b"


def test_the_notebook_relay_copies_whole_lines_as_the_stage_files_grow(tmp_path, capsys):
    from localloss_pp.api import _Relay
    log = tmp_path / "run" / "attempt_0" / "1" / "stderr.log"
    log.parent.mkdir(parents=True)
    log.write_text("[stage 2/2] epoch 1/2 ...\n[stage 2/2] epo")
    relay = _Relay(tmp_path)
    relay.pump()
    assert capsys.readouterr().err == "[stage 2/2] epoch 1/2 ...\n"
    with open(log, "a") as fh:
        fh.write("ch 2/2 ...\nlast words")
    relay.pump()
    assert capsys.readouterr().err == "[stage 2/2] epoch 2/2 ...\n"
    with relay:  # the launch ends: what is left of a line comes out too
        pass
    assert capsys.readouterr().err == "last words\n"


def test_a_run_continues_on_a_copy_of_its_folder_elsewhere(tmp_path):
    root = make_folder(tmp_path / "pets")
    options = dict(OPTIONS, epochs=1)
    lp.train(dataset=f"folder:{root}", run_dir=str(tmp_path / "run"), **options)
    moved = shutil.copytree(root, tmp_path / "elsewhere" / "pets", copy_function=shutil.copy,
                            ignore=shutil.ignore_patterns(".*"))  # new times, no cache
    options["epochs"] = 2
    result = lp.train(dataset=moved, run_dir=str(tmp_path / "run"), resume="auto", **options)
    assert result.epochs == 2 and [r.epoch for r in result.records] == [1, 2]


def test_evaluate_and_train_refuse_what_cannot_work(run, tmp_path):
    root, result = run
    other = make_folder(tmp_path / "other", classes=("x", "y", "z"))
    with pytest.raises(ValueError, match="has the classes x, y, z; the model was trained on "
                       "bottom, middle, top"):
        lp.evaluate(result.run_dir, Path(other))
    with pytest.raises(ValueError, match="dataset mnist5k has 1x28x28 images; the model was "
                       "trained on 3x12x12"):
        lp.evaluate(result.run_dir, "mnist5k")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        lp.evaluate(result.run_dir, batch_size=0)

    def pictures(cfg, train, transform):  # as if defined in a notebook's cell
        return torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4) % 2
    pictures.__module__ = "__main__"
    lp.register_dataset("test-notebook-pictures", pictures,
                        info=lp.DatasetInfo((1, 8, 8), 2, (0.5,), (0.5,)))
    with pytest.raises(ValueError, match="dataset test-notebook-pictures is registered in this "
                       "process's __main__ .* dataset_module=..., or train with stages=1"):
        lp.train(dataset="test-notebook-pictures", model="mlp", num_layers=2, stages=2)
