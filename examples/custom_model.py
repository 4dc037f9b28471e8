"""Bring your own model: a residual MLP defined outside the localloss_pp package.

Its pipeline units are defined here and registered under `--model residual-mlp`; the trainer
imports this module when it is named with `--model-module`, on every process of the run:

    torchrun --standalone --nproc-per-node 2 -m localloss_pp train --dataset mnist5k \\
        --model-module examples.custom_model --model residual-mlp --num-layers 3 --epochs 3

(run from the repository root, or put the module anywhere on PYTHONPATH).
"""
from localloss_pp.models import LocalLinearBlock, OutputLayer, output_loss_scale, register_model


class ResidualLinearUnit(LocalLinearBlock):
    """x -> x + nonlin(BN(Linear(x))), trained by its own local losses (a pred decoder and a sim
    head, from LocalLinearBlock) with its own optimizer and its own dropout generator. Everything
    random in it is drawn from generators seeded by (run seed, unit index), so it computes the
    same numbers in whatever process or pipeline stage it runs."""

    def encode(self, x):
        return x + super().encode(x)  # (the width is kept: num_in == num_out)


@register_model("residual-mlp")
def build(model, loss, input_shape, num_classes, seed):
    """(units, output layer): a first linear unit to --num-hidden features, --num-layers
    residual units, the output layer. Unit i has index i; the output layer comes last."""
    channels, height, width = input_shape
    common = dict(batch_norm=model.batch_norm, seed=seed, num_classes=num_classes, loss=loss,
                  dropout=model.dropout, nonlin=model.nonlin)
    units = [LocalLinearBlock(channels * height * width, model.num_hidden, index=0,
                              first_layer=True, **common)]
    for i in range(1, model.num_layers + 1):
        units.append(ResidualLinearUnit(model.num_hidden, model.num_hidden, index=i,
                                        first_layer=False, **common))
    output = OutputLayer(model.num_hidden, num_classes, index=len(units), seed=seed,
                         zero_init=not loss.backprop,  # the reference's rule for local training
                         loss_scale=output_loss_scale(loss))
    return units, output
