"""Models trained with local losses: losses, blocks, residual units, the built-in zoo and the
registry, the objective registry and its heads. A user's model or objective imports what it
needs from here (docs/usage.md, "Your own model", "Your own objective"):

    from localloss_pp.models import register_model, LocalLinearBlock, OutputLayer
    from localloss_pp.models import register_objective, Head
"""
from localloss_pp.models.blocks import LocalConvBlock, LocalLinearBlock, OutputLayer, \
    output_loss_scale
from localloss_pp.models.model import LocalModel, build_model, combine_digests, count_params, \
    model_digest, state_digest, states_digest, unit_digest, verified_digest
from localloss_pp.models.registry import ENTRY_POINT_GROUP, load_model_module, model_builder, \
    register_model, registered_models, resolve_model
from localloss_pp.models.objectives import Head, ModuleSpec, objective_entry, \
    register_objective, registered_objectives, resolve_objective
from localloss_pp.models import zoo  # noqa: F401  (registers the built-in models)
from localloss_pp.models import heads  # noqa: F401  (registers the built-in objectives)

__all__ = ["register_model", "model_builder", "registered_models", "load_model_module",
           "resolve_model", "ENTRY_POINT_GROUP", "LocalModel", "build_model", "count_params",
           "model_digest", "unit_digest", "state_digest", "states_digest", "combine_digests",
           "verified_digest", "LocalLinearBlock", "LocalConvBlock", "OutputLayer",
           "output_loss_scale", "Head", "ModuleSpec", "register_objective",
           "registered_objectives", "objective_entry", "resolve_objective"]
