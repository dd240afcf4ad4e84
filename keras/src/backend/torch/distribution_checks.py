"""Checks that a model, its distribution and the ranks fit together.

`check_model(model, purpose)` runs when the trainer makes the model's train,
test or predict function: its variables exist by then, and no step has run.
Everything it finds would otherwise show later as a hang or as ranks that
silently diverge, so it raises (or warns) before the first step's
collectives, with the same message on every rank:

- every trainable variable of the model must have been created under the
  distribution: one created before `set_distribution` is a plain tensor
  whose gradient is never reduced, so each rank trains its own copy
  (variables that need no gradient, such as a seed generator's state made
  in a layer's constructor, are assigned global values and may stay
  plain);
- a `LayoutMap` key that matches no variable is reported
  (`layout_map_checks`);
- before training, the ranks must agree on the model's variables (their
  shapes, dtypes and layouts, in the model's order; paths are shown but
  not compared, as a name counter may differ by rank): different model code,
  layouts or dtypes on different ranks would pair unrelated gradients in
  the reductions. One integer per rank is exchanged when they agree
  (`cross_rank.check_same`); and the first backward pass then compares
  each gradient bucket's composition before reducing it
  (`distributed_gradients.verify_next_buckets`), once.

The checks other than the cross-rank ones read only local state, so they
take no collective and are safe when only some ranks evaluate or predict.

Once the checks pass, `check_model` also installs the per-layer gathers of
FSDP-style variables (NOTE [layer gathers] in `layer_gathers`) when the
distribution shards the batch, and the local calls of row-wise layers
(NOTE [local calls] in `local_calls`): it is the one place that sees every
model before its first step. That installs hooks only; it takes no
collective.
"""

import torch

from keras.src.backend.torch import distribution_lib
from keras.src.backend.torch import layer_gathers
from keras.src.backend.torch import layout_map_checks
from keras.src.backend.torch import local_calls
from keras.src.backend.torch import process_group

# How many variable paths a message lists.
_PATHS_SHOWN = 5


def _shown(paths):
    text = ", ".join(repr(path) for path in paths[:_PATHS_SHOWN])
    if len(paths) > _PATHS_SHOWN:
        text += f" and {len(paths) - _PATHS_SHOWN} more"
    return text


def _wrapped_torch_parameters(model):
    """Ids of the parameters of torch modules the model wraps
    (`TorchModuleWrapper`): their variables reuse the module's own
    parameters, never distributed, and promotion handles them."""
    ids = set()
    for layer in model._flatten_layers(include_self=True, recursive=True):
        module = getattr(layer, "module", None)
        if isinstance(module, torch.nn.Module):
            ids.update(id(p) for p in module.parameters())
    return ids


def _check_created_under_distribution(model):
    # A variable created under a distribution has its layout set, even
    # where it stays a plain tensor (NOTE [plain scalars]).
    wrapped = _wrapped_torch_parameters(model)
    early = [
        v.path
        for v in model.trainable_variables
        if v._layout is None and id(v._value) not in wrapped
    ]
    if early:
        raise ValueError(
            f"{len(early)} trainable variable(s) of model {model.name!r} "
            f"were created before the distribution was set: "
            f"{_shown(early)}. They are plain tensors, not distributed, "
            "so their gradients are not reduced and each process would "
            "train its own copy. Call "
            "`keras.distribution.set_distribution(...)` before building "
            "the model (or build it inside `distribution.scope()`), then "
            "load its weights if it was trained already."
        )


def _layout_of(variable):
    value = variable._value
    placements = getattr(value, "placements", None)
    if placements is None:
        return "plain"
    return ",".join(str(p) for p in placements)


def _variables_description(model):
    """Each variable's shape, dtype and layout, by its index in the model,
    and its path as the label: paths may differ between ranks that build the
    same model (a name counter advanced on one rank only)."""
    variables = list(model.variables)
    value = [
        f"shape {tuple(v.shape)} {v.dtype} {_layout_of(v)}" for v in variables
    ]
    labels = {str(i): v.path for i, v in enumerate(variables)}
    return value, labels


def _check_ranks_agree(model):
    from keras.src.backend.torch import cross_rank
    from keras.src.backend.torch import distributed_gradients

    value, labels = _variables_description(model)
    cross_rank.check_same(
        f"variables in model {model.name!r} (numbered in the model's order; "
        "shape, dtype, layout)",
        value,
        "Every rank must run the same model code with the same "
        "distribution and LayoutMap; look for code that depends on the "
        "rank or on the host (its devices, its environment).",
        labels=labels,
    )
    distributed_gradients.verify_next_buckets(model.trainable_variables)


def check_model(model, purpose):
    """Check `model` under the active distribution; see the module doc.

    Then install `layer_gathers` and `local_calls` on it (see the module
    doc).

    Args:
        model: The model whose train, test or predict function is made.
        purpose: `"train"`, `"test"` or `"predict"`. The ranks compare
            their variables only before training, which every rank runs.
    """
    distribution = distribution_lib.active_distribution()
    if distribution is None:
        return
    _check_created_under_distribution(model)
    layout_map_checks.warn_unmatched_keys(model)
    if purpose == "train" and process_group.is_multi_process():
        _check_ranks_agree(model)
    batch_dim_name = getattr(distribution, "batch_dim_name", None)
    if batch_dim_name is not None:
        layer_gathers.install(model, batch_dim_name)
    local_calls.install(model)
