"""A backward pass that raises on every rank, caught, then retried.

The way a user retries after running out of memory: `train_on_batch`
raises from inside backward, the user catches the error and retries the
step with half the batch. The layer that raises sits after the first
Dense layer, so by the time it raises, backward has produced the later
layers' gradients: with 1 KB buckets (KERAS_TORCH_GRADIENT_BUCKET_MB, set
by the test), some of their reductions are in flight and one bucket is
half filled. None of that may join the retried step, which must give one
process's numbers.

Records the losses, the final weights, the gradient bookkeeping left by
the failed step (to show the test reached that state) and after the retry,
and how many gradients the buckets of the first step and of the retry
reduced: a bucket left half filled by the failure would add its gradients
to the retry's.
"""

import common
import numpy as np
import torch

import keras
from keras.src.backend.torch import distributed_gradients

MESSAGE = "out of memory (simulated)"


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if FailingIdentity.armed:
            raise RuntimeError(MESSAGE)
        return grad


class FailingIdentity(keras.layers.Layer):
    """The identity, whose backward raises while `armed` is True."""

    armed = False

    def call(self, x):
        return _RaiseInBackward.apply(x)


def make_model(init):
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(32, activation="tanh"),
            FailingIdentity(),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    common.share_initial_weights(model, init)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _bookkeeping():
    return np.array(
        [
            len(distributed_gradients._filling),
            len(distributed_gradients._in_flight),
            len(distributed_gradients._busy),
        ]
    )


_reduced = []


def _count_reduced_gradients():
    """Record how many gradients each bucket reduces."""
    start = distributed_gradients._Bucket.start

    def counting_start(bucket, *args, **kwargs):
        _reduced.append(len(bucket.grads))
        return start(bucket, *args, **kwargs)

    distributed_gradients._Bucket.start = counting_start


def _reduced_in(step, *args):
    _reduced.clear()
    result = step(*args)
    return result, sum(_reduced)


def main():
    args = common.parse_args()
    _count_reduced_gradients()
    common.set_distribution(keras.distribution.DataParallel())
    model = make_model(args.init)
    x, y = common.data(5, (3, 32, 8), (3, 32, 1))
    loss, reduced_first = _reduced_in(model.train_on_batch, x[0], y[0])
    losses = [loss]
    FailingIdentity.armed = True
    try:
        model.train_on_batch(x[1], y[1])
    except RuntimeError as error:
        assert MESSAGE in str(error), error
        print("caught:", MESSAGE, flush=True)
    else:
        raise AssertionError("The armed step did not raise.")
    finally:
        FailingIdentity.armed = False
    left_by_failure = _bookkeeping()
    # The retry, with half the batch.
    loss, reduced_retry = _reduced_in(
        model.train_on_batch, x[1][:16], y[1][:16]
    )
    losses.append(loss)
    losses.append(model.train_on_batch(x[2], y[2]))
    common.save_results(
        losses=np.array(losses, "float64"),
        left_by_failure=left_by_failure,
        after_retry=_bookkeeping(),
        # Gradients reduced in the first step and in the retry.
        reduced=np.array([reduced_first, reduced_retry]),
        **common.weights_dict(model),
    )


if __name__ == "__main__":
    main()
