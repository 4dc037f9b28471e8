import glob
from pathlib import Path

import pytest

from localloss_pp.cli import build_parser, load_config
from localloss_pp.config import (OptimConfig, build_config, load_toml,
                                 lr_at_epoch, to_toml)

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv):
    return load_config(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("epoch,expected", [(1, 1), (200, 1), (201, 1 / 4), (300, 1 / 4),
                                            (301, 1 / 16), (350, 1 / 16), (351, 1 / 64),
                                            (375, 1 / 64), (376, 1 / 256), (400, 1 / 256)])
def test_lr_schedule_reference_table(epoch, expected):
    assert lr_at_epoch(OptimConfig(lr=1.0), epoch) == pytest.approx(expected)


@pytest.mark.parametrize("ms,changes", [([50, 75, 89, 94], [51, 76, 90, 95]),
                                        ([100, 150, 175, 188], [101, 151, 176, 189])])
def test_lr_decay_starts_the_epoch_after_each_milestone(ms, changes):
    opt = OptimConfig(lr=1.0, lr_decay_milestones=ms)
    lrs = [lr_at_epoch(opt, e) for e in range(1, 201)]
    assert [e for e in range(2, 201) if lrs[e - 1] != lrs[e - 2]] == changes


@pytest.mark.parametrize("epoch,expected", [(1, 0.01), (2, 0.0890), (10, 0.7141),
                                            (11, 0.7907), (80, 0.4), (160, 0.0)])
def test_cosine_schedule_with_warm_up_is_infopros(epoch, expected):
    # InfoPro-Pytorch train.py, adjust_learning_rate with --cos_lr: lr 0.8, 160 epochs, 10
    # warm-up epochs from 0.01 (values of its formula, to 4 decimals)
    opt = build_config(cli_values={"optim": {"optim": "sgd", "momentum": 0.9, "nesterov": True,
                                             "lr": 0.8, "lr_schedule": "cosine",
                                             "lr_warmup_epochs": 10}}).optim
    assert lr_at_epoch(opt, epoch, 160) == pytest.approx(expected, abs=5e-5)
    assert lr_at_epoch(OptimConfig(lr=0.8, lr_schedule="cosine", lr_cosine_epochs=160), 80,
                       3) == pytest.approx(0.4)


def test_no_dataset_or_model_means_the_quickstart_preset():
    cfg = parse()
    assert (cfg.model.name, cfg.data.dataset, cfg.model.num_layers) == ("mlp", "mnist5k", 3)
    assert cfg.train.epochs == 20
    assert parse("--epochs", "2").train.epochs == 2  # flags still override the preset
    ref = parse("--dataset", "CIFAR10")  # naming one of them gives the reference defaults
    assert (ref.model.name, ref.train.epochs, ref.model.num_layers) == ("vgg8b", 400, 1)
    assert ref.optim.lr_decay_milestones == [200, 300, 350, 375]


def test_reference_flags_map_to_the_config():
    cfg = parse("--model", "VGG8B", "--dataset", "cifar10", "--no-batch-norm", "--no-detach",
                "--no-similarity-std", "--no-cuda", "--n_holes", "2", "--length", "14",
                "--lr-decay-milestones", "5", "9", "--bio", "--loss-sup", "pred",
                "--no-print-stats", "--feat-mult", "2")
    assert cfg.model.name == "vgg8b" and cfg.data.dataset == "CIFAR10"
    assert not cfg.model.batch_norm and not cfg.loss.detach and not cfg.loss.similarity_std
    assert cfg.train.device == "cpu" and cfg.data.n_holes == 2 and cfg.data.length == 14
    assert cfg.optim.lr_decay_milestones == [5, 9] and cfg.loss.bio
    assert not cfg.train.print_stats and cfg.model.feat_mult == 2.0


def test_cli_overrides_file_overrides_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nname = "mlp"\nnum_hidden = 64\n[train]\nepochs = 7\n'
                 '[optim]\nlr = 1e-3\n')
    cfg = parse("--config", str(f), "--epochs", "3")
    assert cfg.train.epochs == 3 and cfg.model.num_hidden == 64 and cfg.optim.lr == 1e-3
    assert cfg.data.dataset == "CIFAR10"  # the file named a model: no quick-start preset


@pytest.mark.parametrize("text,message", [
    ('[model]\nnmae = "mlp"\n', "unknown key 'nmae' in [model]"),
    ('[modle]\nname = "mlp"\n', "unknown section [modle]"),
    ('[train]\nepochs = "ten"\n', "[train] epochs must be int"),
    ('[optim]\nlr = true\n', "[optim] lr must be float"),
    ('[optim]\nlr_decay_milestones = [1, 2.5]\n', "lr_decay_milestones must be list[int]"),
    ('[model\n', "not valid TOML"),
])
def test_bad_toml_files(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=None) as err:
        load_toml(f)
    assert message in str(err.value)


@pytest.mark.parametrize("argv,message", [
    (["--model", "alexnet"], "unknown model 'alexnet'"),
    (["--model", "vgg8b", "--pre-act"], "--pre-act chooses the pre-activation ResNet"),
    (["--model", "wresnet12-4"], "the depth of a Wide-ResNet is 6n+4"),
    (["--model", "mine", "--model-module", "no.such.module"],
     "--model-module no.such.module: cannot import it (ModuleNotFoundError"),
    (["--dataset", "CIFAR11"], "unknown dataset 'CIFAR11'"),
    (["--local-modules", "2,x"], "--local-modules must be a number of modules K >= 1"),
    (["--nesterov"], "--nesterov is Nesterov momentum of --optim sgd"),
    (["--lr-schedule", "linear"], "unknown learning-rate schedule"),
    (["--lr-warmup-epochs", "5"], "shape --lr-schedule cosine; add it"),
    (["--loss-unsup", "ae"], "unknown unsupervised loss"),
    (["--optim", "lamb"], "unknown optimizer 'lamb'"),
    (["--nonlin", "gelu"], "unknown nonlinearity"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--beta", "1.5"], "--beta must be in [0, 1]"),
    (["--alpha", "-0.1"], "--alpha must be in [0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--lr-decay-milestones", "5", "5"], "strictly increasing"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--momentum", "0.9"], "only applies to --optim sgd"),
    (["--backprop", "--no-detach"], "cannot be combined"),
    (["--device", "tpu"], "--device must be"),
    (["--device", "cuda:abc"], "--device must be"),
    (["--queue-depth", "0"], "--queue-depth must be >= 1"),
    (["--partition", "3,x"], "--partition must be"),
    (["--backend", "mpi"], "--backend must be"),
    (["--timeout-s", "0"], "--timeout-s must be in [1, 1e+06] seconds, got 0"),
    (["--timeout-s", "1e15"], "--timeout-s must be in [1, 1e+06] seconds, got 1e+15"),
    (["--timeout-s", "1e-9"], "--timeout-s must be in [1, 1e+06] seconds, got 1e-09"),
    (["--feat-mult", "1e308"], "--feat-mult must be in (0, 64]"),
    (["--threads-per-rank", "100000"], "--threads-per-rank must be in [0, 1024]"),
    (["--profile", "5:0:3", "--epochs", "1"], "--profile 5:0:3: epoch 5 is past the last epoch "
     "(--epochs 1)"),
    (["--checkpoint-every", "5", "--backprop"], "--checkpoint-every needs local training"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
])
def test_bad_values_name_the_flag(argv, message):
    with pytest.raises(ValueError) as err:
        parse(*argv)
    assert message in str(err.value)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = parse("--model", "vgg8b", "--dataset", "SVHN", "--lr", "3e-4", "--cutout")
    f = tmp_path / "resolved.toml"
    f.write_text(to_toml(cfg))
    assert build_config(load_toml(f)) == cfg


RECIPES = sorted(set(glob.glob(str(ROOT / "configs" / "**" / "*.toml"), recursive=True))
                 - set(glob.glob(str(ROOT / "configs" / "protocol" / "*.toml"))))
PROTOCOL = sorted(glob.glob(str(ROOT / "configs" / "protocol" / "*.toml")))


@pytest.mark.parametrize("path", PROTOCOL, ids=lambda p: Path(p).stem)
def test_the_local_learning_protocols_configs_load_and_validate(path):
    cfg = build_config(load_toml(path))
    method = Path(path).stem.rsplit("_", 1)[-1]
    assert cfg.model.name == "resnet32" and cfg.optim.nesterov
    assert cfg.optim.lr_schedule == "cosine" and cfg.optim.lr_decay_milestones == []
    assert cfg.loss.backprop == (method == "backprop")
    if method != "backprop":
        assert cfg.loss.loss_sup == method and cfg.loss.local_modules == "4,4,4,4"
    cifar = cfg.data.dataset == "CIFAR10"
    assert (cfg.data.batch_size, cfg.optim.lr, cfg.train.epochs) == \
        ((1024, 0.8, 160) if cifar else (128, 0.1, 20))
    assert lr_at_epoch(cfg.optim, 1, cfg.train.epochs) == pytest.approx(0.01)


def test_every_reference_recipe_has_a_config():
    names = {Path(p).stem for p in RECIPES}
    assert len(glob.glob(str(ROOT / "configs" / "recipes" / "*.toml"))) == 94
    for required in ["mnist_mlp_predsim", "cifar10_vgg8b_backprop", "cifar100_vgg11bx3_sim",
                     "cifar10_vgg8b_predsim-bio", "stl10_vgg8b_predsim_cutout48", "quickstart"]:
        assert required in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: Path(p).stem)
def test_recipe_configs_load_and_validate(path):
    cfg = build_config(load_toml(path))
    assert cfg.data.batch_size == 128 and cfg.optim.optim == "adam"
    text = Path(path).read_text()
    if "backprop = true" in text or 'loss_sup = "pred"' in text:
        assert cfg.model.nonlin == "relu" or "-bio" in Path(path).stem


def test_every_train_flag_has_a_help_text_and_a_group():
    """`localloss-pp train --help` explains every flag: a help text, a metavar for every valued
    flag, and the flags grouped by what they configure."""
    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values()
                 if a.prog.endswith(" train"))
    missing, bare = [], []
    for action in train._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if not action.help or len(action.help) < 15:
            missing.append(action.option_strings[0])
        if action.nargs != 0 and action.metavar is None:
            bare.append(action.option_strings[0])
    assert not missing, f"flags without a help text: {missing}"
    assert not bare, f"valued flags without a metavar: {bare}"
    titles = [g.title for g in train._action_groups]
    for group in ("model", "loss", "data", "optimisation", "pipeline", "checkpoints", "observing"):
        assert any(group in (title or "") for title in titles), (group, titles)
    text = " ".join(train.format_help().split())
    assert "--queue-depth N" in text and "(default: 2)" in text
    assert "quick start: mnist5k" in text  # the preset's value where it differs


def test_a_checkpoint_from_before_an_option_existed_resumes_as_its_default():
    # a checkpoint's manifest written by an earlier version has no key for the options added
    # since (--local-modules, --objective-module, --nesterov, the cosine schedule): those
    # versions behaved as the defaults do, so only a non-default value now is a difference
    from localloss_pp.run.checkpoint import semantic_config
    from localloss_pp.run.resume import _config_diffs
    cfg = parse("--model", "mlp", "--dataset", "mnist5k")
    saved = semantic_config(cfg)
    for section, key in (("loss", "local_modules"), ("loss", "module"), ("optim", "nesterov"),
                         ("optim", "lr_schedule"), ("optim", "lr_warmup_epochs")):
        del saved[section][key]
    assert _config_diffs(saved, cfg) == []
    cfg.loss.local_modules = "4"
    assert _config_diffs(saved, cfg) == ["loss.local_modules: checkpoint '', now '4'"]
