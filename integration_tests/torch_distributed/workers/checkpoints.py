"""Saving, loading and resuming under DataParallel and ModelParallel.

Scenarios (`--scenario`), each run as the single-process reference and
under torchrun; every file lives in `--shared`, which all launches of a
test share:

- `save`: train, then save every way Keras offers (`save_weights`,
  `save`, `ModelCheckpoint` both ways, `ShardedCheckpoint` in the
  background), under DataParallel and ModelParallel (1, 2) in turn. The
  distributed run also loads the reference's files into its sharded
  model, saves from process 0 alone (the DDP habit), and loads files
  whose shapes do not match.
- `load`: rebuild the ModelParallel run's model from its sharded
  checkpoint and its `.keras` file on another mesh (`--mesh`) or in one
  process.
- `resume`: train 4 epochs with `BackupAndRestore` or `ShardedCheckpoint`
  (`--with`); rank 1 kills itself in epoch 3 unless the `killed` flag is
  in `--shared`, and the launch (torchrun's restart, or the test by hand)
  starts it again.
- `interrupted`: process 0 is killed in the middle of writing a second
  `.weights.h5` over a first.
- `streaming`: a `.weights.h5` file of two kernels of 62 MB, one sharded
  by rows and one by columns, saved and loaded: the values each rank
  holds and process 0 writes, and how far each rank's resident memory
  rises above what it held before.
"""

import os
import signal
import time

import common
import models
import numpy as np

import keras

EPOCHS = 2
SAMPLES = 40  # batches of 16, 16 and 8: an uneven last batch
TAG = "one"


def _distribution(name):
    if name == "dp":
        return keras.distribution.DataParallel()
    mesh_shape = {"mp12": (1, 2), "mp21": (2, 1), "mp22": (2, 2)}[name]
    mesh = keras.distribution.DeviceMesh(
        mesh_shape, ("batch", "model"), keras.distribution.list_devices()
    )
    return keras.distribution.ModelParallel(
        layout_map=models.mlp_layout_map(mesh), batch_dim_name="batch"
    )


def _build(width=16):
    model = models.mlp_normalized_inputs(width)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def _data():
    return common.data(0, (SAMPLES, 8), (SAMPLES, 4))


def _optimizer_state(model, prefix):
    return {
        f"{prefix}:{i}": keras.ops.convert_to_numpy(v)
        for i, v in enumerate(model.optimizer.variables)
    }


def _local_shape(variable):
    value = variable.value
    local = value.to_local() if hasattr(value, "to_local") else value
    return np.asarray(tuple(local.shape))


def _error_of(call):
    try:
        call()
    except Exception as error:  # recorded for the test to read
        return f"{type(error).__name__}: {error}"
    return "no error"


def _save_every_way(shared, tag, init):
    x, y = _data()
    model = _build()
    if init:
        common.share_initial_weights(model, init)
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            os.path.join(shared, f"{tag}.ckpt.weights.h5"),
            save_weights_only=True,
        ),
        keras.callbacks.ModelCheckpoint(
            os.path.join(shared, f"{tag}.ckpt.keras")
        ),
        keras.callbacks.ShardedCheckpoint(
            os.path.join(shared, f"{tag}.sharded"), save_on_background=True
        ),
    ]
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    model.save_weights(os.path.join(shared, f"{tag}.weights.h5"))
    model.save(os.path.join(shared, f"{tag}.keras"))
    results = common.weights_dict(model, f"weight:{tag}")
    results.update(_optimizer_state(model, f"opt:{tag}"))
    results[f"pred:{tag}"] = model.predict(x, verbose=0)
    results[f"loss:{tag}"] = np.array(history.history["loss"])
    return model, results


def _load_reference_files(shared, tag):
    """Load the single process's files into this run's sharded model."""
    x, _ = _data()
    model = _build()
    model.load_weights(os.path.join(shared, f"{TAG}.weights.h5"))
    results = {
        f"loaded_weights_pred:{tag}": model.predict(x, verbose=0),
        f"loaded_local_shape:{tag}": _local_shape(
            model.get_layer("hidden").kernel
        ),
    }
    loaded = keras.saving.load_model(os.path.join(shared, f"{TAG}.keras"))
    results[f"loaded_model_pred:{tag}"] = loaded.predict(x, verbose=0)
    results[f"loaded_model_local_shape:{tag}"] = _local_shape(
        loaded.get_layer("hidden").kernel
    )
    results.update(_optimizer_state(loaded, f"loaded_opt:{tag}"))
    return results


def _unsafe_file(shared, tag):
    """A `.keras` file holding Python code, loaded with `safe_mode`."""
    path = os.path.join(shared, f"{tag}.lambda.keras")
    doubling = keras.Sequential(
        [keras.Input((8,)), keras.layers.Lambda(lambda t: t * 2)]
    )
    doubling.save(path)
    x = np.arange(16, dtype="float32").reshape(2, 8)
    return {
        f"unsafe:{tag}": _error_of(lambda: keras.saving.load_model(path)),
        f"unsafe_pred:{tag}": keras.saving.load_model(
            path, safe_mode=False
        ).predict(x, verbose=0),
    }


def _bad_input(shared, tag):
    wider = _build(width=12)
    return {
        **_unsafe_file(shared, tag),
        f"mismatch_h5:{tag}": _error_of(
            lambda: wider.load_weights(
                os.path.join(shared, f"{tag}.weights.h5")
            )
        ),
        f"mismatch_sharded:{tag}": _error_of(
            lambda: wider.load_weights(os.path.join(shared, f"{tag}.sharded"))
        ),
    }


def _save_on_chief_alone(model, shared, tag):
    path = os.path.join(shared, f"{tag}.solo.weights.h5")
    if common.RANK != 0:
        return {}
    started = time.monotonic()
    outcome = _error_of(lambda: model.save_weights(path))
    return {
        f"solo:{tag}": outcome,
        f"solo_seconds:{tag}": time.monotonic() - started,
    }


def save(args):
    shared = args.shared
    if not common.is_distributed():
        keras.utils.set_random_seed(0)
        _, results = _save_every_way(shared, TAG, args.init)
        common.save_results(**results)
        return
    results = {}
    for tag in ("dp", "mp12"):
        keras.distribution.set_distribution(_distribution(tag))
        model, saved = _save_every_way(shared, tag, args.init)
        results.update(saved)
        results[f"local_shape:{tag}"] = _local_shape(
            model.get_layer("hidden").kernel
        )
        results.update(_load_reference_files(shared, tag))
        results.update(_bad_input(shared, tag))
        results.update(_save_on_chief_alone(model, shared, tag))
        keras.distribution.set_distribution(None)
        keras.backend.clear_session()
    common.save_results(**results)


def load(args):
    if common.is_distributed():
        keras.distribution.set_distribution(_distribution(args.layout))
    x, _ = _data()
    results = {}
    for name in ("mp12.sharded", "mp12.keras"):
        model = keras.saving.load_model(os.path.join(args.shared, name))
        results.update(common.weights_dict(model, f"weight:{name}"))
        results.update(_optimizer_state(model, f"opt:{name}"))
        results[f"pred:{name}"] = model.predict(x, verbose=0)
        results[f"local_shape:{name}"] = _local_shape(
            model.get_layer("hidden").kernel
        )
    # `load_weights` by directory, into a model built in code.
    model = _build()
    model.optimizer.build(model.trainable_variables)
    model.load_weights(os.path.join(args.shared, "mp12.sharded"))
    results.update(common.weights_dict(model, "weight:load_weights"))
    results.update(_optimizer_state(model, "opt:load_weights"))
    common.save_results(**results)


class _KillRank1(keras.callbacks.Callback):
    """Kills rank 1 at batch 1 of epoch 3, once (flag file)."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 2 and batch == 1 and common.RANK == 1:
            if not os.path.exists(self.flag):
                open(self.flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)


def resume(args):
    if common.is_distributed():
        keras.distribution.set_distribution(_distribution(args.layout))
    x, y = _data()
    # Dropout draws from a seed generator, whose state a sharded checkpoint
    # restores; `.weights.h5` (BackupAndRestore) does not hold it.
    dropout = 0.25 if args.resume_with == "sharded" else 0.0
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    h = keras.layers.Dropout(dropout, seed=5)(h)
    outputs = keras.layers.Dense(4, name="out")(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    common.share_initial_weights(model, args.init)
    backup = os.path.join(args.shared, f"resume-{args.resume_with}")
    if args.resume_with == "backup":
        checkpoint = keras.callbacks.BackupAndRestore(backup)
    else:
        checkpoint = keras.callbacks.ShardedCheckpoint(
            backup, max_to_keep=2, resume=True
        )
    callbacks = [checkpoint]
    if common.is_distributed():
        callbacks.append(_KillRank1(os.path.join(args.shared, "killed")))
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=4,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
    )
    results = common.weights_dict(model)
    results.update(_optimizer_state(model, "opt"))
    results["epochs"] = np.array(history.epoch)
    results["loss"] = np.array(history.history["loss"])
    common.save_results(**results)


def interrupted(args):
    keras.distribution.set_distribution(_distribution("mp12"))
    model = _build()
    model.predict(_data()[0], verbose=0)
    path = os.path.join(args.shared, "interrupted.weights.h5")
    model.save_weights(path)
    common.save_results(**common.weights_dict(model))
    for variable in model.weights:
        variable.assign(variable + 1.0)
    from keras.src.saving import saving_lib

    keras_setitem = saving_lib.H5IOStore.__setitem__
    written = []

    def setitem_then_die(store, key, value):
        keras_setitem(store, key, value)
        written.append(key)
        if len(written) == 2 and common.RANK == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    saving_lib.H5IOStore.__setitem__ = setitem_then_die
    model.save_weights(path)
    raise AssertionError("process 0 should have died while saving")


def _resident_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_growth_mb(run):
    """How far resident memory rises above its level before `run()`."""
    import torch.distributed as dist

    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets the high-water mark (VmHWM) to VmRSS.
    before = _resident_mb("VmRSS")
    run()
    dist.barrier()
    return _resident_mb("VmHWM") - before


def _local_shards_match(model, values):
    """Whether every rank's shard of each kernel is its part of `values`."""
    import torch

    matches = []
    for variable in model.weights:
        if variable.path not in values:
            continue
        full = torch.from_numpy(values[variable.path])
        dtensor = variable.value
        expected = full
        for mesh_axis, placement in enumerate(dtensor.placements):
            if placement.is_shard():
                pieces = torch.chunk(
                    expected,
                    dtensor.device_mesh.size(mesh_axis),
                    dim=placement.dim,
                )
                index = dtensor.device_mesh.get_coordinate()[mesh_axis]
                expected = pieces[index]
        local = dtensor.to_local().detach()
        matches.append(
            tuple(local.shape) == tuple(expected.shape)
            and torch.equal(local, expected)
        )
    return all(matches) and len(matches) == len(values)


def streaming(args):
    mesh = keras.distribution.DeviceMesh(
        (1, 2), ("batch", "model"), keras.distribution.list_devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["columns/kernel"] = (None, "model")  # (4000, 4094)
    layout_map["rows/kernel"] = ("model", None)  # (4094, 4000)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    inputs = keras.Input((4000,))
    h = keras.layers.Dense(4094, name="columns")(inputs)
    outputs = keras.layers.Dense(4000, name="rows")(h)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    kernels = {}
    for variable in model.weights:
        if variable.path.endswith("kernel"):
            kernels[variable.path] = rng.standard_normal(
                variable.shape, dtype="float32"
            )
            variable.assign(kernels[variable.path])
    results = {"assigned": _local_shards_match(model, kernels)}
    path = os.path.join(args.shared, "streaming.weights.h5")
    results["save_growth_mb"] = _peak_growth_mb(
        lambda: model.save_weights(path)
    )
    if common.RANK == 0:
        import h5py

        with h5py.File(path, "r") as f:
            # The file names layers by class and order; a kernel is its
            # layer's first variable.
            results["written"] = np.array_equal(
                f["layers/dense/vars/0"][()], kernels["columns/kernel"]
            ) and np.array_equal(
                f["layers/dense_1/vars/0"][()], kernels["rows/kernel"]
            )
    for variable in model.weights:
        variable.assign(np.zeros(variable.shape, "float32"))
    results["load_growth_mb"] = _peak_growth_mb(
        lambda: model.load_weights(path)
    )
    results["loaded"] = _local_shards_match(model, kernels)
    results["read_in_full"] = all(
        np.array_equal(keras.ops.convert_to_numpy(v), kernels[v.path])
        for v in model.weights
        if v.path in kernels
    )
    results["largest_mb"] = max(a.nbytes for a in kernels.values()) / 2**20
    common.save_results(**results)


def main():
    args = common.parse_args(
        {
            "--scenario": {"required": True},
            "--shared": {"required": True},
            "--layout": {"default": "dp"},
            "--resume-with": {"default": "backup"},
        }
    )
    {
        "save": save,
        "load": load,
        "resume": resume,
        "interrupted": interrupted,
        "streaming": streaming,
    }[args.scenario](args)


if __name__ == "__main__":
    main()
