"""Keras DataParallel beside native PyTorch DDP, in one torchrun job.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 benchmarks/data_parallel_vs_ddp.py

Both train the same MLP (512-4096-512, ReLU, MSE, SGD) on the same global
batch (128 rows, 64 per rank) on the same ranks. Both are timed over the
same minutes: after warm-up, a callback times each step of `fit` and then
one DDP step (forward, backward, optimizer step and reading the loss), each
after a barrier (`timing.InterleavedTimer`); rank 0 prints the median of
each and their ratio. Before that, the same is timed with no distribution:
each rank trains Keras, and a plain torch loop, on its own rows alone. The
ratio there is Keras's own cost per step (its trainer, layers, loss and
metrics in Python), which no distribution removes. Not a test: nothing
here asserts a timing.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import keras  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
LEARNING_RATE = 0.01


def local_rows(x):
    """This rank's slice of a global batch."""
    world, rank = dist.get_world_size(), dist.get_rank()
    return x[rank * len(x) // world : (rank + 1) * len(x) // world]


def torch_step(x, y, sizes, warmup, ddp=True):
    """A warmed-up training step of the MLP on this rank's rows, under
    native DDP (or, with `ddp=False`, on this rank alone)."""
    model = timing.torch_mlp(sizes)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return timing.sgd_step(
        model, local_rows(x), local_rows(y), LEARNING_RATE, warmup
    )


def keras_fit(x, y, sizes, steps, warmup, native_step):
    """Train the MLP with `fit`, a `native_step` after each step.

    Returns:
        The median ms per step of Keras and of the native side, and the
        median of their per-step ratios.
    """
    model = timing.keras_mlp(sizes)
    model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse")
    timer = timing.fit_side_by_side(model, x, y, steps, warmup, native_step)
    return (*timer.medians(), timer.paired_ratio())


def time_side_by_side(x, y, sizes, steps, warmup):
    """Time Keras beside torch, without and then with distribution.

    Returns:
        Two `keras_fit` results: without a distribution (each rank
        training Keras, and a plain torch loop, on its own rows alone),
        then Keras with `DataParallel` beside DDP.
    """
    # Keras's own cost: the same per-rank work, with no communication.
    local = torch_step(x, y, sizes, warmup, ddp=False)
    alone = keras_fit(local_rows(x), local_rows(y), sizes, steps, warmup, local)
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    ddp = torch_step(x, y, sizes, warmup)
    return alone, keras_fit(x, y, sizes, steps, warmup, ddp)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="512,4096,512")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, sizes[0])).astype("float32")
    y = rng.normal(size=(args.batch, sizes[2])).astype("float32")
    keras.distribution.list_devices()  # Forms the world under torchrun.
    (alone, local, alone_ratio), (ours, ddp, ratio) = time_side_by_side(
        x, y, sizes, args.steps, args.warmup
    )
    if RANK == 0:
        world = dist.get_world_size()
        print(
            f"MLP {args.sizes}, global batch {args.batch}, {world} ranks, "
            f"{args.steps} steps (median)\n"
            f"  torch DDP:             {ddp:8.2f} ms/step\n"
            f"  keras DataParallel:    {ours:8.2f} ms/step\n"
            f"  ratio keras / DDP:     {ratio:8.3f} (median of per-step "
            f"ratios; of the medians: {ours / ddp:.3f})\n"
            f"each rank alone on its {args.batch // world} rows, no "
            "communication (Keras's own cost):\n"
            f"  torch:                 {local:8.2f} ms/step\n"
            f"  keras:                 {alone:8.2f} ms/step\n"
            f"  ratio keras / torch:   {alone_ratio:8.3f} (of the medians: "
            f"{alone / local:.3f})"
        )


if __name__ == "__main__":
    main()
