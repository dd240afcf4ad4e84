"""Timing a Keras `fit` step and a native PyTorch step side by side.

Both benchmarks train the same MLP (Linear or Dense, ReLU, Linear or Dense;
MSE; SGD) on each side: `torch_mlp`, `keras_mlp`, `sgd_step` and
`fit_side_by_side` build and run it.

On a shared machine the speed of a step drifts over a run by more than the
difference being measured, so timing one side and then the other compares
two different minutes. `InterleavedTimer` runs one native step after each
step of `fit`: both sides are timed over the same minutes, each step after
a barrier, and compared by their medians.
"""

import contextlib
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

import keras


@contextlib.contextmanager
def without_promotion():
    """Run native PyTorch code as if Keras were not in the process.

    Under a distribution, Keras installs promotion on
    `DTensor.__torch_function__` (plain tensors that meet DTensors are
    promoted; NOTE [promotion] in `dtensor_promotion`). A native PyTorch
    step run between Keras steps must not pay for it: DTensor's own
    behaviour is restored for the block.
    """
    from keras.src.backend.torch import dtensor_promotion

    with dtensor_promotion.suspended():
        yield


def time_step(step):
    """Run `step()` after a barrier; return its result and its time in ms."""
    dist.barrier()
    start = time.perf_counter()
    result = step()
    return result, (time.perf_counter() - start) * 1000


class InterleavedTimer(keras.callbacks.Callback):
    """Times each step of `fit`, and one native step after each of them.

    Args:
        native_step: A callable running one step of the native PyTorch
            training loop (already warmed up).
        warmup: How many of `fit`'s first steps are neither timed nor
            followed by a native step.
    """

    def __init__(self, native_step, warmup):
        super().__init__()
        self.native_step = native_step
        self.warmup = warmup
        self.keras_times = []
        self.native_times = []
        self.first_loss = None

    def on_train_batch_begin(self, batch, logs=None):
        dist.barrier()
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = (time.perf_counter() - self._start) * 1000
        if batch == 0:
            self.first_loss = float(logs["loss"])
        if batch < self.warmup:
            return
        self.keras_times.append(elapsed)
        with without_promotion():
            _, native = time_step(self.native_step)
        self.native_times.append(native)

    def medians(self):
        """(Keras, native) median ms per step."""
        return (
            statistics.median(self.keras_times),
            statistics.median(self.native_times),
        )

    def paired_ratio(self):
        """The median over steps of (Keras step) / (the native step run
        right after it).

        Each pair runs within a few tens of milliseconds, so a drift of the
        machine's speed over the run cancels out of each ratio, where the
        ratio of the two medians mixes steps from different moments: over
        repeated runs it varies less (four runs of the DataParallel
        benchmark in one job: 1.154-1.169, against 1.121-1.179).
        """
        return statistics.median(
            k / n for k, n in zip(self.keras_times, self.native_times)
        )


def torch_mlp(sizes):
    """The torch MLP `sizes[0]`-`sizes[1]`-`sizes[2]`, seeded."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(sizes[1], sizes[2]),
    )


def keras_mlp(sizes, names=(None, None)):
    """The Keras MLP `sizes[0]`-`sizes[1]`-`sizes[2]`, layers named
    `names`."""
    inputs = keras.Input((sizes[0],))
    h = keras.layers.Dense(sizes[1], activation="relu", name=names[0])(inputs)
    outputs = keras.layers.Dense(sizes[2], name=names[1])(h)
    return keras.Model(inputs, outputs)


def sgd_step(module, x, y, learning_rate, warmup=0):
    """A callable running one MSE + SGD step of `module` on `(x, y)` and
    returning the loss, after `warmup` such steps."""
    optimizer = torch.optim.SGD(module.parameters(), lr=learning_rate)
    x, y = torch.as_tensor(x), torch.as_tensor(y)

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(module(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        step()
    return step


def fit_side_by_side(model, x, y, steps, warmup, native_step, callbacks=()):
    """Train a compiled `model` with `fit` on `steps + warmup` copies of the
    batch `(x, y)`, one `native_step` after each step past `warmup`.

    Returns:
        The `InterleavedTimer` (after `callbacks`, which run first).
    """
    timer = InterleavedTimer(native_step, warmup)
    repeats = steps + warmup
    model.fit(
        np.concatenate([x] * repeats),
        np.concatenate([y] * repeats),
        batch_size=len(x),
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[*callbacks, timer],
    )
    return timer
