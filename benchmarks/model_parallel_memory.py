"""Peak memory per rank under ModelParallel beside one process.

    python benchmarks/model_parallel_memory.py

Builds an MLP of `--layers` Dense layers of `--width` x `--width` (default
4 x 4096 x 4096: 268 MB of float32 parameters), compiles it with Adam and
trains `--steps` steps, once in a single process and once under `torchrun`
on a `(1, N)` mesh whose layout map shards every kernel over the model axis
(column- and row-parallel in turn) and every bias of a column-parallel
layer. Each process reports its peak resident memory (`ru_maxrss`) above
what it held before building the model: parameters, optimizer state,
gradients and activations, and anything initialization made on the way.
The script prints both and the ratio per rank. Not a test.

`--initializer callable` wraps Glorot uniform in a plain function, which
the torch backend cannot draw shard by shard: the full kernel is drawn and
then sharded, as every initializer was before shard-by-shard drawing.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402


def _peak_mb():
    # Linux reports kilobytes.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _layout_map(mesh, layers):
    layout_map = keras.distribution.LayoutMap(mesh)
    for i in range(layers):
        if i % 2 == 0:
            layout_map[f"dense_{i}/kernel"] = (None, "model")
            layout_map[f"dense_{i}/bias"] = ("model",)
        else:
            layout_map[f"dense_{i}/kernel"] = ("model", None)
    return layout_map


def _initializer(name):
    if name == "callable":
        glorot = keras.initializers.GlorotUniform()
        return lambda shape, dtype=None: glorot(shape, dtype=dtype)
    return name


def child(args):
    """Build, compile and train; write this process's figures as JSON."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        mesh = keras.distribution.DeviceMesh(
            (1, world_size), ["batch", "model"]
        )
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=_layout_map(mesh, args.layers)
            )
        )
    x = np.random.default_rng(0).normal(size=(args.batch, args.width))
    x = x.astype("float32")
    before = _peak_mb()
    inputs = keras.Input((args.width,))
    h = inputs
    for i in range(args.layers):
        h = keras.layers.Dense(
            args.width,
            name=f"dense_{i}",
            kernel_initializer=_initializer(args.initializer),
        )(h)
    model = keras.Model(inputs, h)
    after_build = _peak_mb()
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    for _ in range(args.steps):
        model.train_on_batch(x, x)
    after_train = _peak_mb()
    figures = {
        "rank": int(os.environ.get("RANK", 0)),
        "build_mb": after_build - before,
        "peak_mb": after_train - before,
        "params_mb": model.count_params() * 4 / 2**20,
    }
    with open(f"{args.out}.{figures['rank']}.json", "w") as f:
        json.dump(figures, f)


def _run(command, timeout):
    env = dict(os.environ, OMP_NUM_THREADS="1", KERAS_BACKEND="torch")
    subprocess.run(command, env=env, check=True, timeout=timeout)


def add_model_arguments(parser):
    """The MLP's size, shared with `checkpoint_save_load.py`."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument(
        "--initializer",
        default="glorot_uniform",
        help="a Keras initializer name, or `callable`",
    )
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        child(args)
        return
    forwarded = [
        f"--layers={args.layers}",
        f"--width={args.width}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
        f"--initializer={args.initializer}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        single, multi = os.path.join(tmp, "single"), os.path.join(tmp, "multi")
        script = os.path.abspath(__file__)
        _run([sys.executable, script, *forwarded, f"--out={single}"], 600)
        _run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={args.nproc}",
                "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:0",
                script,
                *forwarded,
                f"--out={multi}",
            ],
            600,
        )
        with open(f"{single}.0.json") as f:
            reference = json.load(f)
        ranks = []
        for rank in range(args.nproc):
            with open(f"{multi}.{rank}.json") as f:
                ranks.append(json.load(f))
    print(
        f"{args.layers} x Dense({args.width}), {reference['params_mb']:.0f} "
        f"MB of parameters, Adam, batch {args.batch}, {args.steps} steps, "
        f"initializer {args.initializer}"
    )
    print(
        f"one process: peak +{reference['peak_mb']:.0f} MB "
        f"(after build +{reference['build_mb']:.0f} MB)"
    )
    for figures in ranks:
        print(
            f"rank {figures['rank']} of {args.nproc}: peak "
            f"+{figures['peak_mb']:.0f} MB "
            f"({figures['peak_mb'] / reference['peak_mb']:.2f}x), after "
            f"build +{figures['build_mb']:.0f} MB "
            f"({figures['build_mb'] / reference['build_mb']:.2f}x)"
        )


if __name__ == "__main__":
    main()
