"""Saving a distributed model to one file: one writer, every rank in step.

NOTE [one writer]: a user script calls `model.save(path)` or
`model.save_weights(path)` on every rank with the same path, as it does in
one process. Under a multi-process world, `write_once` makes that write one
complete file:

- Process 0 (the chief) writes into a temporary file in the target's folder
  and renames it into place (`os.replace`), so a reader never sees a
  partial file and an interrupted save leaves the previous one intact.
- A sharded variable is gathered to save it, one at a time, which takes
  every rank. The other ranks walk the same state in the same order
  through a store that converts each value (joining its gather) and drops
  it, so no rank writes anything and none holds more than one full
  variable beyond its shards.
- Every rank returns once the file is in place, or raises the chief's
  error, read from the process group's key-value store (text, never
  pickled).

Ranks meet in the process group's store, not in a collective, so that a
save that needs no gather works on process 0 alone (`if rank == 0:
model.save(...)`, the DDP habit, under `DataParallel`). A save that needs
gathers waits at most `KERAS_TORCH_SAVE_ARRIVAL_TIMEOUT` seconds (default
30) for every rank to arrive, then raises on the ranks that did, rather
than hanging in a gather the others never join.

Each rank numbers its saves to each path; the n-th save to a path is the
same save on every rank (so a save to another path on process 0 alone
does not shift the count). The store's keys are small and left in place
until the world ends.
"""

import contextlib
import os
import tempfile
import time

import torch.distributed as dist

from keras.src.backend.common import global_state
from keras.src.backend.torch import dtensor_utils
from keras.src.backend.torch import process_group
from keras.src.backend.torch import torch_internals

_ARRIVAL_TIMEOUT_ENV = "KERAS_TORCH_SAVE_ARRIVAL_TIMEOUT"
_DEFAULT_ARRIVAL_TIMEOUT_SECONDS = 30
_POLL_SECONDS = 0.005
_saves_per_path = {}


def _store():
    # The default group's store is the one torchrun's rendezvous (or
    # `initialize()`) made; every rank reaches it.
    return torch_internals.default_store()


def _arrival_timeout():
    seconds = os.environ.get(
        _ARRIVAL_TIMEOUT_ENV, _DEFAULT_ARRIVAL_TIMEOUT_SECONDS
    )
    try:
        return float(seconds)
    except ValueError:
        raise ValueError(
            f"{_ARRIVAL_TIMEOUT_ENV} must be a number of seconds. Received: "
            f"{_ARRIVAL_TIMEOUT_ENV}={seconds!r}"
        )


def needs_every_process(values):
    """Whether reading `values` in full takes collectives.

    Args:
        values: Tensors and DTensors (variables' values).

    Returns:
        True if any is a DTensor that is not replicated.
    """
    return any(
        dtensor_utils.is_dtensor(value)
        and not all(p.is_replicate() for p in value.placements)
        for value in values
    )


def _wait_for_every_process(store, key, world_size, filepath):
    deadline = time.monotonic() + _arrival_timeout()
    arrived = store.add(f"{key}/arrived", 0)
    while arrived < world_size:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Saving to {filepath!r} was called on {arrived} of "
                f"{world_size} processes. The model has sharded variables: "
                "saving gathers each of them, which takes every process. "
                "Call `save`/`save_weights` on every process with the same "
                "path (not only `if rank == 0:`): process 0 writes the "
                "file, the others only take part in the gathers. Waited "
                f"{_arrival_timeout():g}s ({_ARRIVAL_TIMEOUT_ENV})."
            )
        time.sleep(_POLL_SECONDS)
        arrived = store.add(f"{key}/arrived", 0)


def _temporary_path(filepath):
    folder, name = os.path.split(os.path.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    descriptor, path = tempfile.mkstemp(
        dir=folder, prefix=f".{name}.", suffix=".tmp"
    )
    os.close(descriptor)
    return path


def _write_at(write, temporary, filepath):
    try:
        write(temporary)
        os.replace(temporary, filepath)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def _status_error(status, filepath):
    return RuntimeError(
        f"Process 0 failed to write {filepath!r}, so no process saved it: "
        f"{status}"
    )


def write_once(write, filepath, read_state, values, atomic=True):
    """Write a model file once, from process 0, with every rank in step.

    See NOTE [one writer]. In one process, `write(filepath)` is called as
    it is.

    Args:
        write: `write(path)` writes the whole file at `path`.
        filepath: The path the user gave.
        read_state: Reads, without writing, every value `write` reads, in
            the same order (so that gathers match across ranks).
        values: The values `write` saves, to tell whether reading them
            takes every rank.
        atomic: If False (a file set, like sharded `.weights.json`),
            process 0 writes at `filepath` directly.
    """
    if not process_group.is_multi_process():
        write(filepath)
        return
    with _no_distribution():
        _write_once(write, filepath, read_state, values, atomic)


@contextlib.contextmanager
def _no_distribution():
    distribution = global_state.get_global_attribute("distribution")
    global_state.set_global_attribute("distribution", None)
    try:
        yield
    finally:
        global_state.set_global_attribute("distribution", distribution)


def _write_once(write, filepath, read_state, values, atomic):
    store = _store()
    target = os.path.abspath(filepath)
    _saves_per_path[target] = _saves_per_path.get(target, 0) + 1
    key = f"keras/save/{target}/{_saves_per_path[target]}"
    gathers = needs_every_process(values)
    store.add(f"{key}/arrived", 1)
    if gathers:
        _wait_for_every_process(store, key, dist.get_world_size(), filepath)
    if dist.get_rank() == 0:
        _write_as_chief(write, filepath, atomic, store, key)
        return
    if gathers:
        # Process 0 opens the file before any gather, so that a path it
        # cannot write fails here on every rank, not in a gather.
        _raise_unless_ok(store, f"{key}/ready", filepath)
        read_state()
    _raise_unless_ok(store, f"{key}/status", filepath)


def _write_as_chief(write, filepath, atomic, store, key):
    try:
        temporary = _temporary_path(filepath) if atomic else filepath
    except BaseException as error:
        store.set(f"{key}/ready", _describe(error))
        store.set(f"{key}/status", _describe(error))
        raise
    store.set(f"{key}/ready", "ok")
    try:
        if atomic:
            _write_at(write, temporary, filepath)
        else:
            write(filepath)
    except BaseException as error:
        store.set(f"{key}/status", _describe(error))
        raise
    store.set(f"{key}/status", "ok")


def _describe(error):
    return f"{type(error).__name__}: {error}"


def _raise_unless_ok(store, key, filepath):
    store.wait([key], process_group._timeout())
    status = store.get(key).decode("utf-8", "replace")
    if status != "ok":
        raise _status_error(status, filepath)
