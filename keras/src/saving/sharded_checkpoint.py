"""Sharded checkpoints on `torch.distributed.checkpoint` (DCP).

A full `.keras` or `.weights.h5` file holds every variable in full, written
by one process. A sharded checkpoint is for models no process should hold
in full: each rank writes only its own shards of the model's variables and
of the optimizer's (Adam's moments, `iterations`, a loss scale), and a
checkpoint loads into any mesh, layout or world size, one process
included, because DCP reshards on load. This module is the torch side of
`keras.callbacks.ShardedCheckpoint` and of `load_weights`/`load_model` on
a checkpoint directory.

A checkpoint is a folder (`step-<n>` under the callback's directory):

- DCP's files: `.metadata` and one `.distcp` file per rank. DCP dedups
  replicated values, so each is written once.
- `keras_checkpoint.json`, written last, by process 0, once DCP has
  finished on every rank: the step and epoch, the Keras version, the
  model's config (unless weights only) and every entry's shape and dtype.
  A folder without it is an interrupted save and is never loaded.

Entries are keyed as `.weights.h5` files are (`_entries`), and include
seed generator states, so that a resumed run draws the dropout masks an
uninterrupted one would.

Loading checks every entry's shape and dtype against the checkpoint's
before DCP reads anything, on every rank alike, so a mismatch raises the
same `ValueError` everywhere instead of failing inside a collective. DCP
reads its `.metadata` with pickle, as `torch.load` does: load checkpoints
you trust, as with any torch checkpoint.
"""

import json
import os
import re
import shutil
import threading

from keras.src import backend

MARKER = "keras_checkpoint.json"
FORMAT = "keras-torch-dcp"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


def step_folder(directory, step):
    """The folder of the checkpoint of `step` under `directory`."""
    return os.path.join(str(directory), f"step-{int(step)}")


def _steps(directory):
    """Complete checkpoints under `directory`, as `{step: folder}`."""
    steps = {}
    if not os.path.isdir(directory):
        return steps
    for name in os.listdir(directory):
        match = _STEP_FOLDER.match(name)
        folder = os.path.join(directory, name)
        if match and os.path.exists(os.path.join(folder, MARKER)):
            steps[int(match.group(1))] = folder
    return steps


def is_checkpoint(path):
    """Whether `path` is a sharded checkpoint or a folder of them."""
    path = str(path)
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, MARKER)):
        return True
    return any(_STEP_FOLDER.match(name) for name in os.listdir(path))


def latest(path):
    """The newest complete checkpoint at `path` (itself, or under it).

    Args:
        path: A checkpoint folder, or a folder of `step-<n>` checkpoints.

    Returns:
        The checkpoint folder.

    Raises:
        ValueError: If `path` holds no complete checkpoint.
    """
    path = str(path)
    if os.path.exists(os.path.join(path, MARKER)):
        return path
    steps = _steps(path)
    if not steps:
        raise ValueError(
            f"No complete sharded checkpoint in {path!r}: expected a folder "
            f"holding `{MARKER}`, or `step-<n>` folders holding one. A "
            "folder without it is a save that did not finish."
        )
    return steps[max(steps)]


def read_info(folder):
    """The `keras_checkpoint.json` of a checkpoint folder, as a dict."""
    with open(os.path.join(folder, MARKER)) as f:
        info = json.load(f)
    if info.get("format") != FORMAT:
        raise ValueError(
            f"{folder!r} is not a Keras sharded checkpoint: its {MARKER} "
            f"has format {info.get('format')!r}, expected {FORMAT!r}."
        )
    return info


def _require_torch():
    if backend.backend() != "torch":
        raise ValueError(
            "Sharded checkpoints are written with torch.distributed."
            "checkpoint and need the torch backend. Received: "
            f"backend={backend.backend()!r}. Set KERAS_BACKEND=torch, or "
            "save a full file (`model.save('model.keras')`)."
        )


def _entries(model, include_optimizer):
    """`{key: variable}` for everything a checkpoint of `model` holds.

    Keys follow the `.weights.h5` layout, which does not depend on how
    the model was built (in code, or from its config): `model/<layer
    path>/<index>` from Keras's own walk of the model, and
    `optimizer/<index>` over `optimizer.variables`. Variables the walk
    does not reach (seed generator states) are `other/<variable path>`.
    """
    optimizer = getattr(model, "optimizer", None)
    walked = _walk_variables(model, skip=[optimizer] if optimizer else [])
    entries = {f"model/{key}": variable for key, variable in walked.items()}
    reached = {id(variable) for variable in entries.values()}
    for variable in model.variables:
        if id(variable) not in reached:
            entries[f"other/{variable.path}"] = variable
    if include_optimizer and optimizer is not None and optimizer.built:
        for index, variable in enumerate(optimizer.variables):
            entries[f"optimizer/{index}"] = variable
    return entries


def _walk_variables(model, skip):
    """The variables `save_weights` would write, by their place in it."""
    from keras.src.backend.common.variables import Variable
    from keras.src.saving import saving_lib

    found = {}

    class CollectingStore(saving_lib.H5IOStore):
        def __init__(self):
            self.mode = "w"

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            return _Entries(found, path)

    saving_lib._save_state(
        model,
        weights_store=CollectingStore(),
        assets_store=None,
        inner_path="",
        visited_saveables={id(o) for o in skip},
    )
    for key, value in found.items():
        if not isinstance(value, Variable):
            raise ValueError(
                f"The layer at {key.rsplit('/', 1)[0]!r} saves a computed "
                f"value ({type(value).__name__}) rather than its variables, "
                "which a sharded checkpoint cannot load in place. Save "
                "this model as a full file (`model.save('model.keras')`)."
            )
    return found


class _Entries:
    """What `make()` gives a layer's `save_own_variables`: keeps keys."""

    def __init__(self, found, path):
        self._found = found
        self._path = path

    def __setitem__(self, key, value):
        self._found[f"{self._path}/{key}".lstrip("/")] = value


def _tensors(entries):
    # `detach()` shares storage (a DTensor's local shard included): DCP
    # writes from it on save and loads into it in place.
    return {key: variable.value.detach() for key, variable in entries.items()}


def _describe(entries):
    return {
        key: {"shape": list(variable.shape), "dtype": variable.dtype}
        for key, variable in entries.items()
    }


def _process_group():
    from keras.src.backend.torch import process_group

    return process_group


class PendingSave:
    """A checkpoint being written in the background (`save(..., True)`).

    Process 0 writes the marker as soon as DCP has finished (its finish
    step waits for every rank's files), from DCP's thread, so a checkpoint
    is complete on disk whether or not anyone waits for it. `wait()`
    blocks until then, and raises the save's error on the ranks that had
    one.
    """

    def __init__(self, future, finish):
        # `async_save` returns a future, or a response holding the
        # upload's future.
        future = getattr(future, "upload_completion", future)
        self._future = future
        self._finish = finish
        self._lock = threading.Lock()
        self._finished = False

        def on_done(done):
            if done.exception() is None:
                self._finish_once()

        future.add_done_callback(on_done)

    def _finish_once(self):
        with self._lock:
            if not self._finished:
                self._finished = True
                self._finish()

    def done(self):
        return self._future.done()

    def wait(self):
        self._future.result()
        # A future's waiters may wake before its callbacks have run.
        self._finish_once()


def save(
    model,
    folder,
    *,
    step,
    epoch,
    include_optimizer=True,
    include_config=True,
    in_background=False,
    process_group=None,
):
    """Write a sharded checkpoint of `model` into `folder`.

    Call it on every rank. Each rank writes its shards; process 0 writes
    the marker once DCP has finished on every rank.

    Args:
        model: The model.
        folder: The checkpoint folder to create.
        step: The optimizer step (recorded, and used to order
            checkpoints).
        epoch: Epochs completed (what a resumed `fit` starts from).
        include_optimizer: Whether to save the optimizer's variables.
        include_config: Whether to save the model's config, so that
            `load_model` can rebuild it.
        in_background: If True, stage the values and write them in a
            background thread; returns a `PendingSave`.
        process_group: The group DCP runs its collectives in; a
            background save needs one of its own.

    Returns:
        A `PendingSave` if `in_background`, else None (the checkpoint is
        complete).
    """
    _require_torch()
    import torch.distributed.checkpoint as dcp

    from keras.src.saving import saving_lib

    entries = _entries(model, include_optimizer)
    config = None
    if include_config:
        config, _ = saving_lib._serialize_model_as_json(model)
    info = {
        "format": FORMAT,
        "version": 1,
        "step": int(step),
        "epoch": int(epoch),
        "keras_version": _keras_version(),
        "model_config": config,
        "entries": _describe(entries),
    }
    folder = str(folder)
    if _process_group().is_initialized():
        chief = _chief()
    else:
        chief = True
    if chief and os.path.exists(folder):
        # A save of this step that did not finish, or one being replaced.
        shutil.rmtree(folder)
    if _is_multi_process():
        import torch.distributed as dist

        dist.barrier()
    os.makedirs(folder, exist_ok=True)

    def finish():
        if chief:
            _write_json(os.path.join(folder, MARKER), info)

    kwargs = {"checkpoint_id": folder, "no_dist": not _is_multi_process()}
    if process_group is not None:
        kwargs["process_group"] = process_group
    if in_background:
        future = dcp.async_save(_tensors(entries), **kwargs)
        return PendingSave(future, finish)
    dcp.save(_tensors(entries), **kwargs)
    finish()
    return None


def _chief():
    import torch.distributed as dist

    return dist.get_rank() == 0


def _is_multi_process():
    return _process_group().is_multi_process()


def _keras_version():
    from keras.src.version import __version__

    return __version__


def _write_json(path, value):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f)
    os.replace(temporary, path)


def _check_compatible(entries, saved, folder):
    """Raise one `ValueError` listing every entry the checkpoint lacks or
    holds with another shape or dtype."""
    problems = []
    for key, variable in entries.items():
        if key not in saved and key.startswith("other/"):
            # Keyed by variable path, which a model rebuilt from its
            # config may not share: those keep their values.
            continue
        if key not in saved:
            problems.append(
                f"variable {variable.path!r} ({key}) is not in the checkpoint"
            )
            continue
        shape = tuple(saved[key]["shape"])
        dtype = saved[key]["dtype"]
        if shape != tuple(variable.shape) or dtype != variable.dtype:
            problems.append(
                f"variable {variable.path!r} ({key}): the checkpoint has "
                f"shape {shape} and dtype "
                f"{dtype}, the model has shape {tuple(variable.shape)} and "
                f"dtype {variable.dtype}"
            )
    if problems:
        shown = "; ".join(problems[:10])
        more = len(problems) - 10
        if more > 0:
            shown += f"; and {more} more"
        raise ValueError(
            f"The sharded checkpoint {folder!r} does not match the model: "
            f"{shown}. Build the model with the same layers and variable "
            "shapes as the model that saved it (the checkpoint lists its "
            f"entries in {MARKER})."
        )


def load(model, path, include_optimizer=True):
    """Load the newest sharded checkpoint at `path` into `model`, in place.

    Call it on every rank. Each variable keeps its current layout: DCP
    reads into each rank's shards only what they hold.

    Args:
        model: A built model (and, to restore the optimizer, a built
            optimizer: `model.optimizer.build(model.trainable_variables)`).
        path: A checkpoint folder, or a folder of them.
        include_optimizer: Whether to load the optimizer's variables.

    Returns:
        The checkpoint's info dict (`step`, `epoch`, ...).
    """
    _require_torch()
    import torch.distributed.checkpoint as dcp

    folder = latest(path)
    info = read_info(folder)
    entries = _entries(model, include_optimizer)
    _check_compatible(entries, info["entries"], folder)
    entries = {k: v for k, v in entries.items() if k in info["entries"]}
    dcp.load(
        _tensors(entries),
        checkpoint_id=folder,
        no_dist=not _is_multi_process(),
    )
    return info


def load_model(path, custom_objects=None, compile=True, safe_mode=True):
    """Rebuild the model saved in a sharded checkpoint, then load it.

    The model is built under the current distribution, so its variables
    take the current layouts, and the checkpoint is read into them.
    """
    from keras.src.saving import saving_lib

    _require_torch()
    folder = latest(path)
    info = read_info(folder)
    if info.get("model_config") is None:
        raise ValueError(
            f"The sharded checkpoint {folder!r} holds weights only "
            "(saved with `save_weights_only=True`), so it cannot rebuild a "
            "model. Build the model in code, then call "
            f"`model.load_weights({str(path)!r})`."
        )
    model = saving_lib._model_from_config(
        info["model_config"],
        custom_objects=custom_objects,
        compile=compile,
        safe_mode=safe_mode,
    )
    optimizer = getattr(model, "optimizer", None)
    has_optimizer = any(key.startswith("optimizer/") for key in info["entries"])
    if optimizer is not None and has_optimizer and not optimizer.built:
        optimizer.build(model.trainable_variables)
    load(model, folder, include_optimizer=has_optimizer)
    return model


def load_weights(model, path):
    """`model.load_weights(path)` on a sharded checkpoint (or a folder).

    Loads the optimizer's state too when the checkpoint holds it and the
    model's optimizer is built, as a `.keras` file's `load_weights` does.
    """
    optimizer = getattr(model, "optimizer", None)
    with_optimizer = optimizer is not None and optimizer.built
    if with_optimizer:
        info = read_info(latest(path))
        with_optimizer = any(
            key.startswith("optimizer/") for key in info["entries"]
        )
    load(model, path, include_optimizer=with_optimizer)


def remove_old(directory, keep, protect=()):
    """Delete all but the newest `keep` complete checkpoints (process 0).

    Unfinished folders older than the newest complete one are deleted
    too; those in `protect` (being written) are kept.
    """
    steps = _steps(directory)
    if not steps:
        return
    newest = sorted(steps)[-keep:] if keep else sorted(steps)
    protect = {os.path.abspath(p) for p in protect}
    for name in os.listdir(directory):
        match = _STEP_FOLDER.match(name)
        folder = os.path.join(directory, name)
        if not match or os.path.abspath(folder) in protect:
            continue
        step = int(match.group(1))
        complete = step in steps
        if (complete and step not in newest) or (
            not complete and step < max(steps)
        ):
            shutil.rmtree(folder, ignore_errors=True)
