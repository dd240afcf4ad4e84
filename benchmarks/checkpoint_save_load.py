"""Saving and loading a sharded model, beside raw DCP on the same tensors.

    python benchmarks/checkpoint_save_load.py

Builds the MLP of `model_parallel_memory.py` (default 4 x Dense(4096):
268 MB of float32 parameters, 805 MB with Adam's moments) under
`ModelParallel` on a `(1, N)` mesh, every kernel sharded, trains one step
so the optimizer's variables exist, and then, on every rank, times:

- `full save` / `full load`: `model.save_weights("w.weights.h5")` and
  `load_weights` of it (one file written by process 0, one variable
  gathered or scattered at a time);
- `sharded save` / `sharded load`: Keras's sharded checkpoint (the
  `ShardedCheckpoint` callback's writer, and `load_weights(directory)`),
  weights alone and with the optimizer;
- `raw DCP save` / `raw DCP load`: `torch.distributed.checkpoint.save` and
  `load` called directly on the same DTensors, keyed by variable path:
  what a PyTorch user would write, and the floor for the sharded rows;
- `fit` with `ShardedCheckpoint(save_freq=...)`, in the background and
  not, beside `fit` with no callback: how much a step slows down.

Each save/load pair is repeated `--repeats` times, Keras's and raw DCP's
interleaved, and reported as medians. Per rank and phase it reports the
seconds, the bytes the process wrote to files (/proc/self/io) and its
peak resident memory above what it held when the phase began (the kernel's
high-water mark, reset per phase through /proc/self/clear_refs): the
"shards + one full variable" rule says full-file saving may add at most
the largest variable (64 MB by default) to what the rank already holds.
Files go to `--dir` (a temporary folder by default); they are written to
the page cache, and DCP also syncs its files, so the times are of this
machine's disk as much as of the code. Not a test; Linux only.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_parallel_memory import _layout_map  # noqa: E402
from model_parallel_memory import add_model_arguments  # noqa: E402


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _written_bytes():
    # `write_bytes` counts what the process sent to storage (files, not
    # sockets: `wchar` would count the collectives' traffic too).
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no write_bytes")


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def measure(run):
    """Seconds, bytes written and peak RSS growth (MB) of `run()`."""
    _barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Resets VmHWM to the current RSS.
    rss = _status_mb("VmRSS")
    written = _written_bytes()
    start = time.perf_counter()
    run()
    _barrier()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "written_mb": (_written_bytes() - written) / 2**20,
        "peak_growth_mb": _status_mb("VmHWM") - rss,
    }


def _build(args):
    inputs = keras.Input((args.width,))
    h = inputs
    for i in range(args.layers):
        h = keras.layers.Dense(args.width, name=f"dense_{i}")(h)
    model = keras.Model(inputs, h)
    model.compile(keras.optimizers.Adam(1e-4), "mse")
    return model


def _raw_state(model, include_optimizer):
    state = {v.path: v.value.detach() for v in model.weights}
    if include_optimizer:
        for v in model.optimizer.variables:
            state[f"optimizer/{v.path}"] = v.value.detach()
    return state


def _save_load_rows(model, args, work):
    import torch.distributed.checkpoint as dcp

    from keras.src.saving import sharded_checkpoint

    h5 = os.path.join(work, "model.weights.h5")
    rows = {}

    def record(name, figures):
        rows.setdefault(name, []).append(figures)

    def fresh(path):
        _barrier()
        if int(os.environ.get("RANK", 0)) == 0 and os.path.exists(path):
            shutil.rmtree(path)
        _barrier()

    for repeat in range(args.repeats):
        record("full save", measure(lambda: model.save_weights(h5)))
        record("full load", measure(lambda: model.load_weights(h5)))
        for with_optimizer in (False, True):
            suffix = " + optimizer" if with_optimizer else ""
            ours = os.path.join(work, "sharded")
            raw = os.path.join(work, "raw")
            for folder in (ours, raw):
                fresh(folder)
            state = _raw_state(model, with_optimizer)
            # Which of the pair runs first alternates between repeats.
            pair = [
                (
                    "sharded save" + suffix,
                    lambda: sharded_checkpoint.save(
                        model,
                        sharded_checkpoint.step_folder(ours, repeat),
                        step=repeat,
                        epoch=0,
                        include_optimizer=with_optimizer,
                        include_config=False,
                    ),
                ),
                (
                    "raw DCP save" + suffix,
                    lambda: dcp.save(state, checkpoint_id=raw),
                ),
            ]
            loads = [
                (
                    "sharded load" + suffix,
                    lambda: sharded_checkpoint.load(
                        model, ours, include_optimizer=with_optimizer
                    ),
                ),
                (
                    "raw DCP load" + suffix,
                    lambda: dcp.load(state, checkpoint_id=raw),
                ),
            ]
            order = -1 if repeat % 2 else 1
            for name, run in pair[::order] + loads[::order]:
                record(name, measure(run))
    return {
        name: {
            key: statistics.median(run[key] for run in runs) for key in runs[0]
        }
        for name, runs in rows.items()
    }


class _StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Runs after the checkpoint callback's, which precedes it.
        self.times.append(time.perf_counter() - self._start)


def _fit_rows(model, x, args, work):
    steps = args.fit_steps
    rows = {}
    for name, background in (("none", None), ("sync", False), ("async", True)):
        callbacks = []
        if background is not None:
            directory = os.path.join(work, f"fit-{name}")
            callbacks.append(
                keras.callbacks.ShardedCheckpoint(
                    directory,
                    save_freq=args.save_freq,
                    save_on_background=background,
                    max_to_keep=1,
                )
            )
        times = _StepTimes()
        _barrier()
        start = time.perf_counter()
        model.fit(
            x,
            x,
            batch_size=args.batch,
            epochs=1,
            steps_per_epoch=steps,
            shuffle=False,
            verbose=0,
            callbacks=callbacks + [times],
        )
        _barrier()
        seconds = time.perf_counter() - start
        saving = [
            t
            for i, t in enumerate(times.times)
            if (i + 1) % args.save_freq == 0
        ]
        rows[name] = {
            "fit_seconds": seconds,
            "median_step_s": statistics.median(times.times),
            "saving_step_s": statistics.mean(saving) if saving else 0.0,
        }
    return rows


def child(args):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    mesh = keras.distribution.DeviceMesh((1, world_size), ["batch", "model"])
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=_layout_map(mesh, args.layers)
        )
    )
    model = _build(args)
    x = np.random.default_rng(0).normal(size=(args.batch, args.width))
    x = x.astype("float32")
    model.train_on_batch(x, x)
    largest = max(np.prod(v.shape) * 4 for v in model.weights) / 2**20
    shards = sum(
        np.prod(v.value.to_local().shape) * 4
        if hasattr(v.value, "to_local")
        else np.prod(v.shape) * 4
        for v in model.weights
    )
    figures = {
        "rank": int(os.environ.get("RANK", 0)),
        "params_mb": model.count_params() * 4 / 2**20,
        "shard_mb": shards / 2**20,
        "largest_variable_mb": largest,
        "save_load": _save_load_rows(model, args, args.work),
    }
    fit_x = np.concatenate([x] * args.fit_steps)
    figures["fit"] = _fit_rows(model, fit_x, args, args.work)
    with open(f"{args.out}.{figures['rank']}.json", "w") as f:
        json.dump(figures, f)


def _report(ranks, args):
    first = ranks[0]
    print(
        f"{args.layers} x Dense({args.width}), {first['params_mb']:.0f} MB "
        f"of parameters (shards {first['shard_mb']:.0f} MB per rank, "
        f"largest variable {first['largest_variable_mb']:.0f} MB), "
        f"ModelParallel (1, {args.nproc}), Adam, medians of "
        f"{args.repeats}"
    )
    print("| | rank | seconds | written MB | peak growth MB | vs raw DCP |")
    print("|---|---|---|---|---|---|")
    for name in first["save_load"]:
        for figures in ranks:
            row = figures["save_load"][name]
            ratio = ""
            if name.startswith("sharded"):
                raw = figures["save_load"][name.replace("sharded", "raw DCP")]
                ratio = f"{row['seconds'] / raw['seconds']:.2f}x"
            print(
                f"| {name} | {figures['rank']} | {row['seconds']:.2f} | "
                f"{row['written_mb']:.0f} | {row['peak_growth_mb']:.0f} | "
                f"{ratio} |"
            )
    print(
        f"fit, {args.fit_steps} steps of batch {args.batch}, "
        f"ShardedCheckpoint every {args.save_freq} steps (with the "
        "optimizer); rank 0:"
    )
    fit = first["fit"]
    for name, row in fit.items():
        print(
            f"  {name:5s} fit {row['fit_seconds']:.2f} s, median step "
            f"{row['median_step_s'] * 1e3:.0f} ms, steps that save "
            f"{row['saving_step_s'] * 1e3:.0f} ms, whole fit "
            f"{row['fit_seconds'] / fit['none']['fit_seconds']:.2f}x"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--fit-steps", type=int, default=20)
    parser.add_argument("--save-freq", type=int, default=10)
    parser.add_argument("--dir", help="where to write (default: a temp dir)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        child(args)
        return
    forwarded = [
        f"--{name.replace('_', '-')}={getattr(args, name)}"
        for name in (
            "layers",
            "width",
            "batch",
            "repeats",
            "fit_steps",
            "save_freq",
        )
    ]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = os.path.join(tmp, "figures")
        env = dict(os.environ, OMP_NUM_THREADS="1", KERAS_BACKEND="torch")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc-per-node={args.nproc}",
                "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:0",
                os.path.abspath(__file__),
                *forwarded,
                f"--out={out}",
                f"--work={tmp}",
            ],
            env=env,
            check=True,
            timeout=1800,
        )
        ranks = []
        for rank in range(args.nproc):
            with open(f"{out}.{rank}.json") as f:
                ranks.append(json.load(f))
    _report(ranks, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ranks": ranks}, f, indent=1)


if __name__ == "__main__":
    main()
