"""Keras DataParallel beside native PyTorch DDP, in one torchrun job.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 benchmarks/data_parallel_vs_ddp.py

Both train the same MLP (512-4096-512, ReLU, MSE, SGD) on the same global
batch (128 rows, 64 per rank) on the same ranks. Each measures the median
wall time of a training step over many steps after warm-up (Keras: a step
of `fit`, timed by a callback; DDP: forward, backward, optimizer step and
reading the loss); rank 0 prints both and their ratio. Not a test: nothing
here asserts a timing.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import keras  # noqa: E402

RANK = int(os.environ.get("RANK", 0))


def median_step_ms(step, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


class StepTimer(keras.callbacks.Callback):
    """Wall time of each training step inside `fit`, after a barrier."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        dist.barrier()
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append((time.perf_counter() - self._start) * 1000)


def keras_data_parallel(x, y, sizes, steps, warmup):
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    inputs = keras.Input((sizes[0],))
    h = keras.layers.Dense(sizes[1], activation="relu")(inputs)
    outputs = keras.layers.Dense(sizes[2])(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    timer = StepTimer()
    repeats = steps + warmup
    model.fit(
        np.concatenate([x] * repeats),
        np.concatenate([y] * repeats),
        batch_size=len(x),
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[timer],
    )
    return statistics.median(timer.times[warmup:])


def torch_ddp(x, y, sizes, steps, warmup):
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    x, y = torch.as_tensor(x[rows]), torch.as_tensor(y[rows])
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(sizes[0], sizes[1]),
        torch.nn.ReLU(),
        torch.nn.Linear(sizes[1], sizes[2]),
    )
    model = torch.nn.parallel.DistributedDataParallel(module)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        loss.item()

    return median_step_ms(step, steps, warmup)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="512,4096,512")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, sizes[0])).astype("float32")
    y = rng.normal(size=(args.batch, sizes[2])).astype("float32")
    keras.distribution.list_devices()  # Forms the world under torchrun.
    ddp = torch_ddp(x, y, sizes, args.steps, args.warmup)
    ours = keras_data_parallel(x, y, sizes, args.steps, args.warmup)
    if RANK == 0:
        print(
            f"MLP {args.sizes}, global batch {args.batch}, "
            f"{dist.get_world_size()} ranks, {args.steps} steps (median)\n"
            f"  torch DDP:             {ddp:8.2f} ms/step\n"
            f"  keras DataParallel:    {ours:8.2f} ms/step\n"
            f"  ratio keras / DDP:     {ours / ddp:8.3f}"
        )


if __name__ == "__main__":
    main()
