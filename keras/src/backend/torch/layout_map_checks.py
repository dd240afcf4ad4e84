"""A `LayoutMap` key that matches no variable of the model, said once.

`LayoutMap` looks a variable up by its whole path: an exact key, or a key
that `re.fullmatch`es the path. A variable that no key matches is
replicated, silently, and so is the whole model when a key is written for
the wrong path (`"dense.*kernel"` matches `dense/kernel` in a functional
model but not `sequential/dense/kernel` in a Sequential one). The user
then trains with every rank holding the full model and no error.

`warn_unmatched_keys(model)` runs when the model's train, test or predict
function is made, once its variables exist: it warns, on process 0, about
each key that matches none of them, naming the key and a few paths it
could have matched. Each key of a `LayoutMap` is reported once, however
many models and calls see it. The check reads only local state (every rank
holds the same map and variable paths), so it takes no collective.
"""

import warnings

from keras.src.backend.torch import distribution_lib
from keras.src.distribution.sharding_summary import key_matches

# How many of the model's variable paths a warning lists.
_PATHS_SHOWN = 5


def _unmatched_keys(layout_map, paths):
    return [
        key
        for key in layout_map.keys()
        if not any(key_matches(key, path) for path in paths)
    ]


def warn_unmatched_keys(model):
    """Warn about the active `LayoutMap`'s keys that match no variable.

    Args:
        model: The model about to train, evaluate or predict.
    """
    distribution = distribution_lib.active_distribution()
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is None or not len(layout_map):
        return
    paths = [variable.path for variable in model.variables]
    if not paths:
        return
    # Kept on the map, so a key is reported once per map.
    reported = layout_map.__dict__.setdefault("_unmatched_reported", set())
    unmatched = [
        key for key in _unmatched_keys(layout_map, paths) if key not in reported
    ]
    reported.update(unmatched)
    if not unmatched or distribution_lib.process_id() != 0:
        return
    shown = ", ".join(repr(path) for path in paths[:_PATHS_SHOWN])
    more = len(paths) - _PATHS_SHOWN
    if more > 0:
        shown += f" and {more} more"
    for key in unmatched:
        warnings.warn(
            f"LayoutMap key {key!r} matches no variable of model "
            f"{model.name!r}, so it shards nothing and the variables it "
            f"was meant for are replicated on every process. Keys must "
            f"match a variable's whole path (`re.fullmatch`); this "
            f"model's paths are {shown}. To match a path at any depth, "
            f"start the key with '.*' (e.g. {'.*' + key.lstrip('^')!r}).",
            stacklevel=2,
        )
