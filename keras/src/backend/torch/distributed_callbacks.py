"""Callbacks under a multi-process distribution: one writer, all in step.

Every rank runs every callback, since saving a model reads distributed
variables, which takes collectives all ranks must join. `adapt` fits the
built-in callbacks that write files to that:

- `ModelCheckpoint` needs nothing: `save`/`save_weights` write one file,
  from process 0, with every rank in step (NOTE [one writer] in
  `distributed_saving.py`).
- `BackupAndRestore` saves its weights the same way; its own files (the
  training metadata, the `.bkp` copies, removing the folder at the end)
  are written by process 0 alone, and every rank waits for the removal
  so that none sees a half-removed backup at the next `fit`.
- `EarlyStopping(restore_best_weights=True)` keeps the best weights as
  each rank's shards, not as full arrays (`_ShardKeepingModel`).
- The logs of `CSVLogger` and `TensorBoard` are written by process 0; on
  the other ranks they go to a scratch folder of their own, removed at
  exit. They hold logs only, never checkpoints.

Progress bars print on process 0 only (`keras.src.distribution.process_output`).
"""

import atexit
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

# Callback class name -> the attribute holding the path it writes to.
_OUTPUT_ATTRIBUTES = {
    "CSVLogger": "filename",
    "TensorBoard": "log_dir",
}
_scratch = []


def _scratch_dir():
    if not _scratch:
        from keras.src.backend.torch import distribution_lib

        path = tempfile.mkdtemp(
            prefix=f"keras-rank{distribution_lib.process_id()}-"
        )
        _scratch.append(path)
        atexit.register(shutil.rmtree, path, True)
    return _scratch[0]


def _output_attribute(callback):
    for cls in type(callback).__mro__:
        if cls.__name__ in _OUTPUT_ATTRIBUTES:
            return _OUTPUT_ATTRIBUTES[cls.__name__]
    return None


def _is_chief():
    return dist.get_rank() == 0


def adapt(callbacks):
    """Fit `callbacks` to a multi-process run (see the module docstring).

    Args:
        callbacks: The callbacks of a `CallbackList`, on every rank.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    if not _is_chief():
        _redirect_file_outputs(callbacks)
    for callback in callbacks:
        if getattr(callback, "_adapted_to_processes", False):
            continue
        callback._adapted_to_processes = True
        name = _known_class(callback)
        if name == "BackupAndRestore":
            _adapt_backup_and_restore(callback)
        elif name == "EarlyStopping":
            _adapt_early_stopping(callback)


def _known_class(callback):
    for cls in type(callback).__mro__:
        if cls.__name__ in ("BackupAndRestore", "EarlyStopping"):
            return cls.__name__
    return None


def _adapt_backup_and_restore(callback):
    chief_save = callback._save_model
    chief_end = callback.on_train_end

    def save_model():
        if _is_chief():
            chief_save()
        else:
            # Takes part in the gathers; process 0 writes.
            callback.model.save_weights(
                filepath=callback._weights_path, overwrite=True
            )

    def on_train_end(logs=None):
        try:
            if _is_chief():
                chief_end(logs)
        finally:
            dist.barrier()

    callback._save_model = save_model
    callback.on_train_end = on_train_end


class _ShardKeepingModel:
    """A model whose `get_weights` copies each rank's shards, not arrays.

    Everything else is the model's own. `set_weights` takes what
    `get_weights` gave back.
    """

    def __init__(self, model):
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        setattr(self._model, name, value)

    def get_weights(self):
        with torch.no_grad():
            return [v.value.detach().clone() for v in self._model.weights]

    def set_weights(self, weights):
        for variable, value in zip(self._model.weights, weights):
            variable.assign(value)


def _adapt_early_stopping(callback):
    keras_set_model = callback.set_model

    def set_model(model):
        if not isinstance(model, _ShardKeepingModel):
            model = _ShardKeepingModel(model)
        keras_set_model(model)

    callback.set_model = set_model
    if getattr(callback, "_model", None) is not None:
        set_model(callback._model)


def _redirect_file_outputs(callbacks):
    """Point the log outputs of `callbacks` at this rank's scratch folder.

    Args:
        callbacks: The callbacks of a non-chief process.
    """
    for callback in callbacks:
        attribute = _output_attribute(callback)
        if attribute is None or getattr(callback, "_redirected", False):
            continue
        path = str(getattr(callback, attribute)).rstrip(os.sep)
        name = os.path.basename(path) or "output"
        setattr(callback, attribute, os.path.join(_scratch_dir(), name))
        callback._redirected = True
