"""Writing a model file from one process of many.

Under a multi-process distribution every process runs the user's script,
so every process calls `save`/`save_weights` with the same path. The
backend's `distribution_lib.write_once`, where it has one, makes that one
file written by one process (see NOTE [one writer] in
`keras/src/backend/torch/distributed_saving.py`). The other processes
still read every value the file holds, in the same order, because reading
a sharded variable gathers it. `_discarding_store()` is the weights store
they read into: it converts each value and drops it.

Backends without `write_once` (or a single process) write as before.
"""

from keras.src import backend


def _discarding_store():
    """A weights store that reads every value it is given and keeps none."""
    # Imported here: `saving_lib` imports this module.
    from keras.src.saving import saving_lib

    class DiscardingStore(saving_lib.H5IOStore):
        def __init__(self):
            self.mode = "w"

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            return self

        def __setitem__(self, key, value):
            backend.convert_to_numpy(value)

        def close(self):
            pass

    return DiscardingStore()


def _read_state(model, objects_to_skip):
    from keras.src.saving import saving_lib

    visited = set(id(o) for o in objects_to_skip or ())
    saving_lib._save_state(
        model,
        weights_store=_discarding_store(),
        assets_store=None,
        inner_path="",
        visited_saveables=visited,
    )


def _saved_values(model):
    variables = list(model.variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += list(optimizer.variables)
    return [variable.value for variable in variables]


def write_once(write, filepath, model, objects_to_skip=None, atomic=True):
    """Write `model`'s file with `write(path)`, once across processes.

    Args:
        write: Writes the whole file at the path it is given.
        filepath: The path the user gave.
        model: The model being saved.
        objects_to_skip: Saveables `write` skips, if any.
        atomic: Whether the file may be written elsewhere and renamed into
            place (False for a set of files).
    """
    distribution_lib = backend.distribution_lib
    coordinate = getattr(distribution_lib, "write_once", None)
    if coordinate is None:
        write(filepath)
        return
    coordinate(
        write,
        str(filepath),
        read_state=lambda: _read_state(model, objects_to_skip),
        values=_saved_values(model),
        atomic=atomic,
    )
