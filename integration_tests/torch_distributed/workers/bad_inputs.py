"""A catalogue of bad input, run in one launch: each case must raise the
same clear error on every rank, before any collective can deadlock.

Every case is run in turn on every rank and its error caught; the next case
then runs in the same processes, so a case that left the ranks out of step
(one rank in a collective the other never joins) hangs the run, and the
test's timeout fails it. The last step trains a model under `DataParallel`
to show the ranks are still in step.

Each rank prints `case <name>: <ErrorType>: <message on one line>` and
saves the messages as `message:<name>`.
"""

import common
import numpy as np

import keras

RANK = common.RANK


def _devices():
    return keras.distribution.list_devices()


def _model_parallel(mesh=None, kernel=(None, "model"), **kwargs):
    if mesh is None:
        mesh = keras.distribution.DeviceMesh(
            (1, len(_devices())), ["batch", "model"], _devices()
        )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = kernel
    return keras.distribution.ModelParallel(layout_map=layout_map, **kwargs)


def _build_dense(units=4, **kwargs):
    keras.layers.Dense(units, **kwargs).build((None, 4))


def _train(model, x=None, batch_size=8):
    x = np.ones((16, 4), "float32") if x is None else x
    model.compile(optimizer="sgd", loss="mse")
    model.fit(
        x, np.ones((len(x), 2), "float32"), batch_size=batch_size, verbose=0
    )


def _mlp(hidden=4):
    return keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(hidden), keras.layers.Dense(2)]
    )


def mesh_larger_than_world():
    devices = [f"cpu:{i}" for i in range(len(_devices()) + 1)]
    mesh = keras.distribution.DeviceMesh((len(devices),), ["batch"], devices)
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(device_mesh=mesh)
    )
    _build_dense()


def repeated_axis_names():
    mesh = keras.distribution.DeviceMesh(
        (1, len(_devices())), ["model", "model"], _devices()
    )
    keras.distribution.set_distribution(
        _model_parallel(mesh, batch_dim_name="model")
    )
    _build_dense()


def unknown_axis_in_layout():
    keras.distribution.set_distribution(_model_parallel(kernel=(None, "tp")))
    _build_dense()


def layout_with_more_entries():
    keras.distribution.set_distribution(
        _model_parallel(kernel=(None, "model", None))
    )
    _build_dense()


def batch_dim_name_not_in_mesh():
    keras.distribution.set_distribution(_model_parallel(batch_dim_name="data"))
    _train(_mlp())


def malformed_device_name():
    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["cpu:0", "cpu:one"])
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(device_mesh=mesh)
    )
    _build_dense()


def unknown_device_type():
    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["tpu:0", "tpu:1"])
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(device_mesh=mesh)
    )
    _build_dense()


def device_named_twice():
    mesh = keras.distribution.DeviceMesh((2,), ["batch"], ["cpu:0", "cpu:0"])
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(device_mesh=mesh)
    )
    _build_dense()


def initialize_with_another_world_size():
    keras.distribution.initialize(num_processes=len(_devices()) + 1)


def initialize_with_another_rank():
    keras.distribution.initialize(process_id=(RANK + 1) % len(_devices()))


def distribution_set_after_variables():
    model = _mlp()
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    _train(model)


def ranks_build_different_shapes():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    _build_dense(units=4 + RANK)


def ranks_build_different_dtypes():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    _build_dense(dtype="float32" if RANK == 0 else "float64")


def ranks_use_different_layouts():
    kernel = (None, "model") if RANK == 0 else (None, None)
    keras.distribution.set_distribution(_model_parallel(kernel=kernel))
    _build_dense()


def ranks_build_different_models():
    # Rank 1 adds a layer at the end: its first variables match rank 0's.
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    layers = [keras.Input((4,)), keras.layers.Dense(4), keras.layers.Dense(2)]
    if RANK == 1:
        layers.append(keras.layers.Dense(2))
    _train(keras.Sequential(layers))


class _TwoLayers(keras.Model):
    """Two Dense(4) layers, applied in an order that depends on the rank:
    the same variables, but backward produces their gradients in another
    order."""

    def __init__(self):
        super().__init__()
        self.first = keras.layers.Dense(4)
        self.second = keras.layers.Dense(4)

    def call(self, x):
        if RANK == 0:
            return self.second(self.first(x))
        return self.first(self.second(x))


def ranks_run_layers_in_different_orders():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _TwoLayers()
    model.build((None, 4))
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((16, 4), "float32")
    model.fit(x, np.ones((16, 4), "float32"), batch_size=8, verbose=0)


def ranks_read_different_batch_sizes():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    _train(_mlp(), batch_size=8 if RANK == 0 else 4)


def ranks_read_different_numbers_of_batches():
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    _train(_mlp(), x=np.ones((16 + 8 * RANK, 4), "float32"))


CASES = [
    mesh_larger_than_world,
    repeated_axis_names,
    unknown_axis_in_layout,
    layout_with_more_entries,
    batch_dim_name_not_in_mesh,
    malformed_device_name,
    unknown_device_type,
    device_named_twice,
    initialize_with_another_world_size,
    initialize_with_another_rank,
    distribution_set_after_variables,
    ranks_build_different_shapes,
    ranks_build_different_dtypes,
    ranks_use_different_layouts,
    ranks_build_different_models,
    ranks_run_layers_in_different_orders,
    ranks_read_different_batch_sizes,
    ranks_read_different_numbers_of_batches,
]


def still_in_step():
    """Train under DataParallel; return the weights (the same on every
    rank when the ranks are in step)."""
    keras.utils.set_random_seed(7)
    if common.is_distributed():
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    model = _mlp()
    x, y = common.data(3, (16, 4), (16, 2))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    return model.get_weights()


def main():
    if not common.is_distributed():
        # The single-process reference for `still_in_step`.
        keras.distribution.set_distribution(None)
        weights = still_in_step()
        common.save_results(**{f"weight:{i}": w for i, w in enumerate(weights)})
        return
    messages = {}
    for case in CASES:
        try:
            case()
        except Exception as error:  # Every case must raise.
            text = " ".join(str(error).split())
            messages[f"message:{case.__name__}"] = text
            print(
                f"case {case.__name__}: {type(error).__name__}: {text}",
                flush=True,
            )
        else:
            messages[f"message:{case.__name__}"] = "(no error)"
            print(f"case {case.__name__}: no error", flush=True)
        finally:
            keras.distribution.set_distribution(None)
            keras.backend.clear_session()
    weights = still_in_step()
    common.save_results(
        **messages, **{f"weight:{i}": w for i, w in enumerate(weights)}
    )


if __name__ == "__main__":
    main()
