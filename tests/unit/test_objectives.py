"""The objective registry, local modules (--local-modules) and the DGL head: names, grouping,
initialisation independent of K, where gradients flow, the paper's heads at a module's end,
and one-line errors for what does not fit (docs/algorithm.md 10.1, 10.2)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from localloss_pp.cli import main
from localloss_pp.config import LossConfig, ModelConfig, OptimConfig, build_config
from localloss_pp.data.datasets import Mnist5k
from localloss_pp.models import (Head, build_model, register_objective, registered_objectives,
                                 resolve_objective, unit_digest)
from localloss_pp.models.heads import DGLHead, InfoProHead, infopro_weights, \
    supervised_contrastive
from localloss_pp.models.losses import onehot
from localloss_pp.models.modules import LocalModule, ModuleOutput, module_sizes
from localloss_pp.models.objectives import ModuleSpec
from localloss_pp.observe.metrics import read_jsonl
from localloss_pp.pipeline.stage import forwards, local_updates
from runargs import mlp_args

CPU = torch.device("cpu")


def net(name="resnet20", shape=(1, 28, 28), **loss):
    m = build_model(ModelConfig(name=name, feat_mult=0.25, num_layers=2, num_hidden=32),
                    LossConfig(**loss), shape, 10, seed=3)
    for unit in m.units():
        unit.setup(CPU, OptimConfig())
        unit.set_lr(2e-3)
    return m


def step(m, x, y):
    h, ctxs = forwards(m.blocks, x)
    return local_updates(m.blocks, ctxs, h, y, onehot(y, 10), m.output)


def test_the_registry_names_the_papers_and_the_literatures_objectives():
    assert {"pred", "sim", "predsim", "dgl"} <= set(registered_objectives())
    lo = LossConfig(loss_sup="DGL")
    assert resolve_objective(lo).name == "dgl" and lo.loss_sup == "dgl"
    with pytest.raises(ValueError, match="unknown local objective 'mse' \\(--loss-sup\\); "
                                         "choose one of: .*dgl"):
        resolve_objective(LossConfig(loss_sup="mse"))


@pytest.mark.parametrize("loss,message", [
    (dict(loss_sup="dgl", bio=True), "--bio changes the paper's local losses"),
    (dict(loss_sup="dgl", loss_unsup="sim"), "--loss-unsup sim adds the paper's"),
    (dict(loss_sup="dgl", detach=False), "--no-detach sends the global gradient")])
def test_the_papers_options_are_refused_with_other_objectives(loss, message):
    with pytest.raises(ValueError, match=message):
        resolve_objective(LossConfig(**loss))


def test_module_sizes_balanced_listed_or_refused():
    costs = [1.0, 1.0, 1.0, 4.0, 4.0]
    assert module_sizes("", costs) == [1] * 5
    assert module_sizes("3", costs) == [3, 1, 1]  # balanced by parameters
    assert module_sizes("2,2,1", costs) == [2, 2, 1]
    with pytest.raises(ValueError, match="--local-modules 2,2 covers 4 units, but the model has "
                                         "5; the sizes must add up to 5"):
        module_sizes("2,2", costs)
    with pytest.raises(ValueError, match="--local-modules 6: the model has only 5 units"):
        module_sizes("6", costs)
    with pytest.raises(ValueError, match="--local-modules 1 makes the whole network one module"):
        build_model(ModelConfig(name="resnet20"), LossConfig(loss_sup="dgl", local_modules="1"),
                    (1, 28, 28), 10, seed=0, materialize=())
    with pytest.raises(ValueError, match="--local-modules must be a number of modules"):
        build_config(cli_values={"loss": {"local_modules": "0,3"}})
    with pytest.raises(ValueError, match="--local-modules 4 groups the units for local"):
        build_config(cli_values={"loss": {"local_modules": 4, "backprop": True}})


def test_modules_group_units_and_the_last_one_trains_with_the_output_layer():
    m = net(loss_sup="dgl", local_modules="3,3,4")  # resnet20: 10 units
    assert [type(b) for b in m.blocks] == [LocalModule, LocalModule]
    assert isinstance(m.output, ModuleOutput) and len(m.output.members) == 4
    assert [u.index for u in m.units()] == [0, 1, 2]
    assert m.stat_fields == ("loss", "loss_pred", "correct")
    assert m.blocks[1].in_shape == (4, 28, 28) and m.blocks[1].out_shape == (8, 14, 14)
    # the default: one module per unit (the last one joins the output layer)
    assert len(net(loss_sup="dgl").blocks) == 9


def test_the_backbone_starts_from_the_same_weights_whatever_k():
    a, b = net(loss_sup="dgl", local_modules="3,3,4"), net(loss_sup="dgl", local_modules="2,8")
    members = lambda m: [u for blk in m.units() for u in blk.members]  # noqa: E731
    assert [unit_digest(u) for u in members(a)] == [unit_digest(u) for u in members(b)]
    plain = build_model(ModelConfig(name="resnet20", feat_mult=0.25), LossConfig(backprop=True),
                        (1, 28, 28), 10, seed=3)
    assert [unit_digest(u) for u in members(a)] == [unit_digest(u) for u in plain.blocks]


def test_gradients_flow_through_a_module_and_stop_at_its_end():
    m = net(loss_sup="dgl", local_modules="3,3,4")
    first, second = m.blocks[0].members[0], m.blocks[1].members[0]
    x = torch.randn(8, 1, 28, 28)
    y = torch.arange(8) % 10
    h, ctxs = forwards(m.blocks, x)
    m.blocks[1].local_backward(ctxs[1], y, onehot(y, 10))
    assert first.convs[0].encoder.weight.grad is None  # nothing crosses into module 1
    assert second.convs[0].encoder.weight.grad is not None  # module 2's first unit learns
    m.blocks[0].local_backward(ctxs[0], y, onehot(y, 10))
    assert first.convs[0].encoder.weight.grad.abs().sum() > 0


def mnist5k_batches(n, size=64):
    data = Mnist5k(train=True)
    pick = np.random.default_rng(0).permutation(len(data))[:n * size]
    x = torch.from_numpy(data.data[pick].astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.as_tensor(np.asarray(data.targets)[pick]).long()
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n * size, size)]


@pytest.mark.parametrize("loss", [dict(loss_sup="dgl", local_modules="3"),
                                  dict(loss_sup="predsim", local_modules="3"),
                                  dict(loss_sup="dgl", name="mlp")])
def test_every_module_learns_on_mnist5k(loss):
    m = net(loss.pop("name", "resnet20"), **loss)
    batches = mnist5k_batches(4)
    first = [s[0].item() for s in step(m, *batches[0])[0]]
    for _ in range(6):
        for x, y in batches:
            stats, _ = step(m, x, y)
    last = [s[0].item() for s in step(m, *batches[0])[0]]
    assert all(b < a for a, b in zip(first, last)), (first, last)


def test_dgl_head_is_the_papers_auxiliary_network():
    spec = ModuleSpec(index=0, num_modules=4, out_shape=(16, 32, 32), in_shape=(3, 32, 32),
                      input_shape=(3, 32, 32), num_classes=10, loss=LossConfig(),
                      model=ModelConfig(), seed=0)
    head = DGLHead(spec)
    # 3 x (1x1 conv 16->16 + BN), then 3 x (Linear 64->64 + BN1d) on the 2x2 map, Linear 64->10
    convs = 3 * (16 * 16 + 2 * 16)
    mlp = 3 * (64 * 64 + 64 + 2 * 64) + 64 * 10 + 10
    assert sum(p.numel() for p in head.parameters()) == convs + mlp
    assert head.reduced == (8, 8)


def test_a_head_builder_that_returns_no_head_is_a_clear_error():
    register_objective("test-not-a-head", lambda spec: torch.nn.Linear(2, 2), terms=())
    with pytest.raises(ValueError, match="objective test-not-a-head: its head builder returned "
                                         "Linear, not a localloss_pp Head"):
        net(loss_sup="test-not-a-head")

    class Broken(Head):
        def __init__(self, spec):
            raise RuntimeError("no such layer")
    register_objective("test-broken", Broken, terms=())
    with pytest.raises(ValueError, match="objective test-broken: building its heads for "
                                         "resnet20 failed \\(RuntimeError: no such layer\\)"):
        net(loss_sup="test-broken")


def test_an_objective_of_ones_own_from_the_command_line(tmp_path, capsys, monkeypatch):
    # examples/custom_objective.py, named with --objective-module, run from the repository root
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    run = tmp_path / "probe"
    assert main(["train", *mlp_args(3, 32, "--epochs", "1", quiet=False),
                 "--objective-module", "examples.custom_objective", "--loss-sup", "linear-probe",
                 "--run-dir", str(run), "--no-progress"]) == 0
    rec = read_jsonl(run / "metrics.jsonl")[0]
    assert len(rec["blocks"]) == 2  # 3 units: 2 modules with a probe, the last the output's
    for block in rec["blocks"]:
        assert set(block["train"]) == {"index", "loss", "loss_pred", "loss_size", "error"}
        assert block["train"]["loss_size"] > 0 and block["test"]["error"] < 90
    assert "train pred " in capsys.readouterr().err  # the log lines name the terms
    assert main(["train", *mlp_args(), "--objective-module", "examples.no_such_module",
                 "--run-dir", str(tmp_path / "bad")]) == 2
    assert "--objective-module examples.no_such_module: cannot import it" in \
        capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_params_shows_the_modules_and_their_heads(capsys):
    assert main(["params", "--model", "resnet32", "--dataset", "CIFAR10", "--loss-sup", "dgl",
                 "--local-modules", "4,4,4,4"]) == 0
    out = capsys.readouterr().out
    assert "total: 466906 (0.467 M)" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    # module 0: the stem and 3 blocks of 16 channels; its DGL head on 16 x 32 x 32
    assert ["0", "4", "14,480", "14,378"] == rows[-2][:4] and rows[-2][4].endswith("%")
    for objective in ("predsim", "infopro"):  # heads that read the labels' one-hot, the image
        assert main(["params", "--model", "resnet32", "--dataset", "MNIST", "--loss-sup",
                     objective, "--local-modules", "4,4,4,4"]) == 0
        assert capsys.readouterr().out.count("%") == 3
    assert main(["params", "--model", "resnet32", "--loss-sup", "dgl", "--local-modules",
                 "40"]) == 2
    assert "--local-modules 40: the model has only 16 units" in capsys.readouterr().err


def spec_for(shape, index=0, num_modules=4, loss="infopro", input_shape=(3, 32, 32)):
    return ModuleSpec(index=index, num_modules=num_modules, out_shape=shape,
                      in_shape=shape, input_shape=input_shape, num_classes=10,
                      loss=LossConfig(loss_sup=loss), model=ModelConfig(), seed=0,
                      input_mean=(0.5, 0.5, 0.5), input_std=(0.25, 0.25, 0.25))


def test_infopro_heads_and_weights_are_the_published_ones():
    with torch.device("meta"):
        head = InfoProHead(spec_for((16, 32, 32)))
    # decoder: 3x3 16->12 (+bias), BN 12, 3x3 12->3 (+bias); classifier "1c2f" on 16 channels:
    # 3x3 16->32 stride 2 (no bias), BN 32, Linear 32->128, Linear 128->128 (contrastive)
    decoder = 9 * 16 * 12 + 12 + 2 * 12 + 9 * 12 * 3 + 3
    aux = 9 * 16 * 32 + 2 * 32 + 32 * 128 + 128 + 128 * 128 + 128
    assert sum(p.numel() for p in head.parameters()) == decoder + aux == 2091 + 25408
    with torch.device("meta"):
        last = InfoProHead(spec_for((64, 8, 8), index=2), contrast=False)
    assert last.aux[0].stride == (1, 1) and last.aux[0].out_channels == 64
    assert last.aux[-1].out_features == 10
    # ResNet-32, K = 4 (comand.sh: ixx_1 6, ixy_1 0, ixx_2 1, ixy_2 2): linear in between
    assert [infopro_weights(i, 4) for i in range(3)] == [(6, 0), (3.5, 1), (1, 2)]
    assert infopro_weights(0, 2) == (5, 1)
    # another K: the pairs of the nearest published K, from its first to its last head
    assert infopro_weights(0, 15) == infopro_weights(0, 16) == (5, 0.05)
    assert infopro_weights(13, 15) == infopro_weights(14, 16) == (0.2, 0.5)
    with pytest.raises(ValueError, match="infopro reconstructs the input image from a module's "
                                         "feature map; this model's units give vectors"):
        net("mlp", loss_sup="infopro")


def test_supervised_contrastive_loss_against_its_definition():
    z = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    t, total = 0.07, 0.0
    for i in range(6):
        others = [k for k in range(6) if k != i]
        denom = sum(torch.exp(z[i] @ z[k] / t) for k in others)
        pos = [j for j in others if y[j] == y[i]]
        if pos:
            total -= sum(torch.log(torch.exp(z[i] @ z[j] / t) / denom) for j in pos) / len(pos)
    expected = total / 6  # anchor 3 (class 2) has no positive: it adds 0
    got = supervised_contrastive(z, y, t)
    assert abs(got.item() - float(expected)) < 1e-9


def test_infopro_reconstructs_the_un_normalised_input_and_every_module_learns():
    m = net(loss_sup="infopro-ce", local_modules="3")
    assert all(b.needs_input for b in m.blocks) and m.stat_fields[1:3] == ("loss_pred",
                                                                           "loss_recon")
    head = m.blocks[0].head
    assert head.size == (28, 28) and head.decoder[-1].out_channels == 1
    batches = mnist5k_batches(3)
    with pytest.raises(ValueError, match="its objective reads the network's input, but none"):
        step(m, *batches[0])
    first = None
    for _ in range(5):
        for x, y in batches:
            h, ctxs = forwards(m.blocks, x, image=x)
            stats, _ = local_updates(m.blocks, ctxs, h, y, onehot(y, 10), m.output)
            first = first or [s.tolist() for s in stats]
    last = [s.tolist() for s in stats]
    # the reconstruction term of every module falls (its decoder learns the image)
    assert all(b[2] < a[2] for a, b in zip(first, last)), (first, last)


@pytest.mark.parametrize("argv,message", [
    (["--model", "mlp", "--loss-sup", "infopro"], "infopro reconstructs the input image from a "
     "module's feature map; this model's units give vectors of 32 values"),
    (["--model", "resnet20", "--loss-sup", "dgl", "--compile"], "--compile compiles the paper's "
     "per-layer blocks; the local modules of --loss-sup dgl run eagerly: drop --compile"),
    (["--model", "resnet20", "--loss-sup", "dgl", "--local-modules", "6,6"],
     "--local-modules 6,6 covers 12 units, but the model has 10"),
    (["--model", "resnet20", "--loss-sup", "dgl", "--bio"], "--bio changes the paper's")])
def test_objectives_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    assert main(["train", "--dataset", "mnist5k", "--num-layers", "2", "--num-hidden", "32",
                 "--feat-mult", "0.25", *argv, "--run-dir", str(run), "--epochs", "1",
                 "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and message in err[0], err
    assert not run.exists() or not any(run.iterdir())  # nothing written
