"""One row of `compare_all.py`: a Keras distribution beside native PyTorch.

Run by `compare_all.py`, one torchrun job per row; alone, for example:

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 benchmarks/transformer_rows.py \
        --model lm --kind tp --json /tmp/row.json

`--model` is `lm` (`transformer_models.keras_lm` and `TorchLM`, Adam,
sparse categorical cross-entropy from logits over every token) or `mlp`
(`timing.keras_mlp` and `timing.torch_mlp`, MSE, SGD). `--kind` is the
distribution, each beside what a PyTorch user would write instead:

- `single`: no distribution, one process: `fit` beside a plain loop;
- `dp`: `DataParallel` beside `DistributedDataParallel`;
- `tp`: `ModelParallel` on a `(1, N)` mesh with Megatron-style layouts
  (`transformer_models.keras_*_megatron_layouts`) beside
  `parallelize_module` with the same plan (`torch_*_tp_plan`);
- `fsdp`: `ModelParallel` on a `(N,)` mesh, every variable split over
  "batch" on its first dimension, beside FSDP2's `fully_shard` on each
  block (each Linear of the MLP) and the root;
- `2d`: a `(N / 2, 2)` mesh, Megatron layouts on "model" and the batch
  split over "batch" (variables replicated over it, as data parallelism),
  beside `parallelize_module` on the "model" submesh and then `fully_shard`
  on the "batch" submesh (FSDP2 x TP, torch's documented 2-D composition:
  the native side also shards its parameters over "batch"). torch's
  composable DDP (`replicate(module, device_mesh=...)`) over a TP module
  is not used: its forward swaps the DTensor parameters for local ones, so
  an optimizer built before the first forward never updated the sharded
  ones, and one built after a first forward failed with DDP's
  "parameters that did not receive grad".

`--compile` runs Keras with `jit_compile=True` beside `torch.compile` of the
native model (wrapped, parallelized; the LM's `2d` row compiles each block
before `fully_shard`, as the whole model compiled failed there). Both start
from the same weights (a Keras model built with seed 0 before any
distribution, copied into torch) on the same global batch.

What is measured: the native side is warmed up first (`--warmup` steps),
its last warm-up step inside a `CollectiveCounter` (the collectives of one
step by kind, API and mesh axis, from `model_parallel_vs_tp`; compiled,
the native step is not counted but timed alone for `--steps` steps); then
`fit` runs `--warmup + --steps` steps, the collectives of its last warm-up
step counted alike, and after warm-up one native step after each Keras
step, each after a barrier (`timing.InterleavedTimer`). Per rank:
parameter and optimizer-state bytes held locally (local shards) by each
side, the process's peak RSS (both sides live in one process) and, on
CUDA, each side's peak `max_memory_allocated` above what was allocated
before it was built (the native side's includes its compiled code's
buffers, the Keras side's its warm-up steps). The first-step losses of
both sides (the native one averaged over data-parallel ranks) are
compared. Rank 0 writes all of it as JSON to `--json`. On CUDA each rank
uses its LOCAL_RANK's GPU and NCCL, else CPU and gloo. If a side fails
(e.g. `jit_compile=True` under a distribution), its error text is written
in the JSON instead of its figures.

The fewest collectives a step needs (the `minimum` field), with B the
global batch, S the sequence, W the width, L the blocks, P the parameter
count, N the ranks:

- `dp`: one all-reduce of every gradient element (P elements, in any
  number of buckets); Keras also all-reduces its loss for its metrics;
- `tp`: LM: all-reduces of B*S*W activations: 2 per block forward
  (attention output, FFN output) plus 1 for the vocabulary-split
  embedding, and 2 per block backward (the input gradients of the
  column-parallel q/k/v and FFN-in): 4L + 1. MLP: 1 (the row-parallel
  output; the first layer's input needs no gradient);
- `fsdp`: every parameter all-gathered for the forward (P elements out)
  and, if resharded after the forward, again for the backward; every
  gradient reduce-scattered (P elements in);
- `2d`: the `tp` all-reduces over "model" on B / (N / 2) rows, plus one
  all-reduce over "batch" of each rank's local gradient elements (the
  Keras layout's; the native TP x FSDP2 instead all-gathers and
  reduce-scatters over "batch").

The counted `elements` of a collective are those of all its tensor
arguments (`CollectiveCounter`): for a c10d op (`torch.distributed`, which
DDP, FSDP2 and Keras's gradient reduction call) output buffers are
arguments too, so an all-gather counts its input and its output.
"""

import argparse
import json
import os
import resource
import statistics
import traceback

os.environ.setdefault("KERAS_BACKEND", "torch")

import model_parallel_vs_tp as mp  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformer_models as tm  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

import keras  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
KINDS = ("single", "dp", "tp", "fsdp", "2d")
NATIVE_NAMES = {
    "single": "torch loop",
    "dp": "DDP",
    "tp": "parallelize_module",
    "fsdp": "FSDP2 fully_shard",
    "2d": "TP x FSDP2",
}
KERAS_NAMES = {
    "single": "fit, no distribution",
    "dp": "DataParallel",
    "tp": "ModelParallel (1, N) Megatron",
    "fsdp": "ModelParallel (N,) FSDP layouts",
    "2d": "ModelParallel (N/2, 2) Megatron + DP",
}


def device():
    if torch.cuda.is_available():
        return torch.device("cuda", LOCAL_RANK)
    return torch.device("cpu")


def error_text(error):
    """The last lines of an exception's traceback."""
    lines = traceback.format_exception(error)
    return "".join(lines)[-3000:]


def local_bytes(tensor):
    """Bytes of the part of `tensor` (a DTensor's local shard) this rank
    holds."""
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def world_labels():
    """Labels for `CollectiveCounter`: the default group as "world"."""
    world = dist.get_world_size()
    return {dist.group.WORLD.group_name: f"'world' ({world} ranks)"}


def counts_as_json(counter):
    return {
        "collectives": [
            {
                "kind": kind,
                "api": api,
                "axis": axis,
                "count": count,
                "elements": counter.elements[(kind, api, axis)],
            }
            for (kind, api, axis), count in sorted(counter.counts.items())
        ],
        "dtensor_ops": counter.dtensor_ops,
    }


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_since(base):
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() - base


def cuda_reset():
    """Reset the CUDA peak; return the bytes allocated now (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


class Setup:
    """The row's data, initial weights and sizes, the same on every rank."""

    def __init__(self, args):
        self.args = args
        self.lm = args.model == "lm"
        rng = np.random.default_rng(1)
        keras.utils.set_random_seed(0)
        if self.lm:
            tokens = rng.integers(0, args.vocab, (args.batch, args.seq + 1))
            self.x = tokens[:, :-1].astype("int32")
            self.y = tokens[:, 1:].astype("int32")
            model = self.keras_model()
        else:
            self.sizes = [int(s) for s in args.mlp_sizes.split(",")]
            self.x = rng.normal(size=(args.mlp_batch, self.sizes[0]))
            self.y = rng.normal(size=(args.mlp_batch, self.sizes[2]))
            self.x = self.x.astype("float32")
            self.y = self.y.astype("float32")
            model = self.keras_model()
        self.weights = model.get_weights()
        self.parameters = sum(w.size for w in self.weights)

    def keras_model(self):
        a = self.args
        if self.lm:
            return tm.keras_lm(a.vocab, a.seq, a.width, a.heads, a.blocks)
        return timing.keras_mlp(self.sizes, names=("up", "down"))

    def torch_model(self):
        """The native model on this rank's device, holding the weights."""
        a = self.args
        if self.lm:
            module = tm.TorchLM(a.vocab, a.seq, a.width, a.heads, a.blocks)
            tm.copy_into_torch(self.weights, module)
        else:
            module = timing.torch_mlp(self.sizes)
            with torch.no_grad():
                for linear, kernel, bias in zip(
                    (module[0], module[2]),
                    self.weights[0::2],
                    self.weights[1::2],
                ):
                    linear.weight.copy_(torch.from_numpy(kernel.T))
                    linear.bias.copy_(torch.from_numpy(bias))
        return module.to(device())

    def keras_compile(self, model, jit_compile):
        a = self.args
        if self.lm:
            optimizer = keras.optimizers.Adam(a.learning_rate)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        else:
            optimizer = keras.optimizers.SGD(a.mlp_learning_rate)
            loss = "mse"
        model.compile(optimizer, loss, jit_compile=jit_compile)

    def torch_step(self, module, rows):
        """A callable running one native training step on `rows` of the
        global batch (a slice), returning the loss."""
        a = self.args
        params = [p for p in module.parameters() if p.requires_grad]
        if self.lm:
            optimizer = torch.optim.Adam(params, lr=a.learning_rate, eps=1e-7)
            x = torch.as_tensor(self.x[rows], dtype=torch.long)
            y = torch.as_tensor(self.y[rows], dtype=torch.long)
        else:
            optimizer = torch.optim.SGD(params, lr=a.mlp_learning_rate)
            x = torch.as_tensor(self.x[rows])
            y = torch.as_tensor(self.y[rows])
        x, y = x.to(device()), y.to(device())

        def loss_of(out):
            if self.lm:
                return F.cross_entropy(out.flatten(0, 1), y.flatten())
            return F.mse_loss(out, y)

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(module(x))
            loss.backward()
            optimizer.step()
            return loss.item()

        return step, optimizer


def rows_of(rank, parts, batch):
    return slice(rank * batch // parts, (rank + 1) * batch // parts)


def build_native(setup, kind, compiled):
    """The native side, parallelized as `kind` (and compiled).

    Returns:
        (module, step, optimizer, collective labels, data-parallel group or
        None).
    """
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    batch = len(setup.x)
    module = setup.torch_model()
    device_type = device().type
    labels = world_labels()
    dp_group = None
    if kind == "single":
        rows = slice(None)
    elif kind == "dp":
        device_ids = [LOCAL_RANK] if device_type == "cuda" else None
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=device_ids
        )
        rows = rows_of(rank, world, batch)
        dp_group = dist.group.WORLD
    elif kind == "tp":
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh(
            device_type, (world,), mesh_dim_names=("model",)
        )
        labels.update(mp._axis_labels(mesh))
        plan = (tm.torch_lm_tp_plan if setup.lm else tm.torch_mlp_tp_plan)(
            module
        )
        parallelize_module(module, mesh, plan)
        rows = slice(None)
    elif kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(
            device_type, (world,), mesh_dim_names=("batch",)
        )
        labels.update(mp._axis_labels(mesh))
        units = module.blocks if setup.lm else (module[0], module[2])
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(module, mesh=mesh)
        rows = rows_of(rank, world, batch)
        dp_group = dist.group.WORLD
    elif kind == "2d":
        from torch.distributed.tensor.parallel import parallelize_module

        mesh = init_device_mesh(
            device_type, (world // 2, 2), mesh_dim_names=("batch", "model")
        )
        labels.update(mp._axis_labels(mesh))
        plan = (tm.torch_lm_tp_plan if setup.lm else tm.torch_mlp_tp_plan)(
            module
        )
        parallelize_module(module, mesh["model"], plan)
        from torch.distributed.fsdp import fully_shard

        units = module.blocks if setup.lm else (module[0], module[2])
        if compiled and setup.lm:
            # Block by block, as TP x FSDP2 users compile (the whole model
            # compiled failed: "Mixing fake modes NYI").
            for unit in units:
                unit.compile()
            compiled = False
        for unit in units:
            fully_shard(unit, mesh=mesh["batch"])
        fully_shard(module, mesh=mesh["batch"])
        dp = mesh["batch"]
        rows = rows_of(dp.get_local_rank(), dp.size(), batch)
        dp_group = dp.get_group()
    else:
        raise ValueError(f"Unknown kind {kind!r}; expected one of {KINDS}.")
    step_module = torch.compile(module) if compiled else module
    step, optimizer = setup.torch_step(step_module, rows)
    return module, step, optimizer, labels, dp_group


def run_native(setup, args):
    """Build and warm up the native side; return (result dict, step)."""
    base = cuda_reset()
    module, step, optimizer, labels, dp_group = build_native(
        setup, args.kind, args.compile
    )
    if args.compile:
        # Not counted: a step of the compiled TP module run inside a
        # `TorchDispatchMode` made its next call outside it fail
        # ("'FunctionalTensor' object has no attribute 'trigger_wait'",
        # on recompiling). The eager row's counts are the same layout's.
        counts = {"collectives_not_counted": "compiled (see the eager row)"}
        first_loss = step()
        for _ in range(args.warmup - 1):
            step()
    else:
        counter = mp.CollectiveCounter(labels)
        first_loss = mp.warm_up(step, args.warmup, counter)
        counts = counts_as_json(counter)
    loss = torch.tensor([first_loss], dtype=torch.float64)
    if dp_group is not None:
        dist.all_reduce(loss, group=dp_group)
        loss /= dist.get_world_size(dp_group)
    params = sum(local_bytes(p) for p in module.parameters())
    state = sum(
        local_bytes(v)
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    trained = [p for p in module.parameters() if p.requires_grad]
    # Compiled, the native step is also timed alone before Keras runs:
    # under a distribution Keras's `jit_compile=True` fails, and a native
    # step compiled before it may fail once it has (its error recorded).
    alone = time_alone(step, args.steps) if args.compile else None
    result = {
        "median_ms_alone_before_keras": alone,
        "name": NATIVE_NAMES[args.kind],
        # Adam keeps state for each parameter it updated: fewer than the
        # module's would mean a wrapper hid some from the optimizer.
        "parameters_updated": f"{len(optimizer.state)} of {len(trained)}"
        if setup.lm
        else None,
        "first_loss": float(loss.item()),
        **counts,
        "param_bytes": params,
        "optimizer_bytes": state,
        "cuda_peak_bytes": cuda_peak_since(base),
        "local_parameters": sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel()
            for p in module.parameters()
        ),
    }
    return result, step


class Probe(keras.callbacks.Callback):
    """Counts the collectives of step `index` of `fit`, records the CUDA
    peak at the end of it, and on CUDA ends each step with a synchronize
    (listed before the `InterleavedTimer`, it runs first)."""

    def __init__(self, counter, index, base):
        super().__init__()
        self.counter = counter
        self.index = index
        self.base = base
        self.cuda_peak = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.index:
            self.counter.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        # Runs before the timer's end of the step: on CUDA, the step's
        # kernels are waited for (the native step waits in `loss.item()`).
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch == self.index:
            self.counter.__exit__(None, None, None)
            self.cuda_peak = cuda_peak_since(self.base)


def keras_distribution(setup, kind):
    """Set the row's Keras distribution; return its torch mesh or None."""
    D = keras.distribution
    if kind == "single":
        return None
    if kind == "dp":
        distribution = D.DataParallel()
        D.set_distribution(distribution)
        return distribution.device_mesh.backend_mesh
    devices = D.list_devices()
    n = len(devices)
    if kind == "tp":
        mesh = D.DeviceMesh((1, n), ["batch", "model"], devices)
    elif kind == "fsdp":
        mesh = D.DeviceMesh((n,), ["batch"], devices)
    else:
        mesh = D.DeviceMesh((n // 2, 2), ["batch", "model"], devices)
    layout_map = D.LayoutMap(mesh)
    if kind == "fsdp":
        if setup.lm:
            tm.keras_lm_fsdp_layouts(layout_map)
        else:
            tm.keras_mlp_fsdp_layouts(layout_map)
    elif setup.lm:
        tm.keras_lm_megatron_layouts(layout_map)
    else:
        tm.keras_mlp_megatron_layouts(layout_map)
    D.set_distribution(
        D.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    )
    return mesh.backend_mesh


def run_keras(setup, args, native_step):
    """Train with `fit` under the row's distribution, interleaved with
    `native_step`; return (result dict, timer)."""
    base = cuda_reset()
    mesh = keras_distribution(setup, args.kind)
    keras.utils.set_random_seed(0)
    model = setup.keras_model()
    model.set_weights(setup.weights)
    setup.keras_compile(model, args.compile)
    labels = world_labels()
    if mesh is not None:
        labels.update(mp._axis_labels(mesh))
    counter = mp.CollectiveCounter(labels)
    probe = Probe(counter, args.warmup - 1, base)
    timer = timing.fit_side_by_side(
        model,
        setup.x,
        setup.y,
        args.steps,
        args.warmup,
        native_step,
        callbacks=[probe],
    )
    result = {
        "name": KERAS_NAMES[args.kind],
        "first_loss": timer.first_loss,
        **counts_as_json(counter),
        "param_bytes": sum(local_bytes(v.value) for v in model.variables),
        "optimizer_bytes": sum(
            local_bytes(v.value) for v in model.optimizer.variables
        ),
        "cuda_peak_bytes": probe.cuda_peak,
        "local_parameters": sum(
            local_bytes(v.value) // v.value.element_size()
            for v in model.trainable_variables
        ),
    }
    return result, timer


def time_alone(step, steps):
    """The median ms of `steps` runs of `step` (a native step timed
    without Keras beside it, when Keras's side failed)."""
    from keras.src.backend.torch import dtensor_promotion

    with dtensor_promotion.suspended():
        times = [timing.time_step(step)[1] for _ in range(steps)]
    return statistics.median(times)


def minimum_collectives(setup, kind, world, local):
    """The fewest collectives one step needs (see the module docstring)."""
    a = setup.args
    p = setup.parameters
    if kind == "single":
        return "none"
    if kind == "dp":
        return f"all_reduce of {p:,} gradient elements (any buckets)"
    if setup.lm:
        activations = a.batch * a.seq * a.width
        count = 4 * a.blocks + 1
    else:
        activations = a.mlp_batch * setup.sizes[2]
        count = 1
    if kind == "tp":
        return f"{count} all_reduce of {activations:,} elements"
    if kind == "fsdp":
        return (
            f"all_gather of {p:,} elements (x2 if resharded after forward), "
            f"reduce_scatter of {p:,} gradient elements"
        )
    dp = world // 2
    local = "(unknown: both sides failed)" if local is None else f"{local:,}"
    return (
        f"{count} all_reduce of {activations // dp:,} elements over 'model' "
        f"+ all_reduce of {local} local gradient elements "
        "over 'batch'"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("lm", "mlp"), default="lm")
    parser.add_argument("--kind", choices=KINDS, default="single")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--mlp-sizes", default="512,4096,512")
    parser.add_argument("--mlp-batch", type=int, default=128)
    parser.add_argument("--mlp-learning-rate", type=float, default=0.01)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.warmup < 2:
        parser.error("--warmup must be at least 2 (its last step is counted).")
    # Forms the world under torchrun (NCCL on CUDA, else gloo).
    keras.distribution.list_devices()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    world = dist.get_world_size()
    if args.kind == "2d" and world % 2:
        parser.error(f"--kind 2d needs an even number of ranks, not {world}.")
    setup = Setup(args)
    row = {
        "model": args.model,
        "kind": args.kind,
        "compiled": args.compile,
        "ranks": world,
        "parameters": setup.parameters,
        "device": device().type,
        "backend": dist.get_backend(),
        "threads": torch.get_num_threads(),
    }
    # The native side first: once Keras has made a DTensor, its promotion
    # sees DTensor calls; `timing` sets it aside for each native step.
    try:
        native, native_step = run_native(setup, args)
    except Exception as error:  # Recorded; Keras is still timed alone.
        native = {"name": NATIVE_NAMES[args.kind], "error": error_text(error)}
        native_step = None
    row["native"] = native
    native_failure = []

    def guarded_step():
        """The native step, its failure told apart from Keras's."""
        try:
            return native_step()
        except Exception as error:
            native_failure.append(error_text(error))
            raise

    try:
        keras_side, timer = run_keras(
            setup, args, guarded_step if native_step else (lambda: None)
        )
    except Exception as error:  # Recorded in the JSON; the row goes on.
        row["keras"] = {
            "name": KERAS_NAMES[args.kind],
            "error": "stopped: the native step between Keras steps failed"
            if native_failure
            else error_text(error),
        }
        if native_failure:
            native["error"] = native_failure[0]
            native_step = None
    else:
        row["keras"] = keras_side
        keras_ms, native_ms = timer.medians()
        keras_side["median_ms"] = keras_ms
    if "median_ms" not in row["keras"] and native_step is not None:
        try:
            native["median_ms"] = time_alone(native_step, args.steps)
        except Exception as error:
            native["error"] = (
                "timed alone after Keras's side failed, the native step "
                "failed (it had run its warm-up steps before Keras):\n"
                + error_text(error)
            )
    elif native_step is not None:
        native["median_ms"] = native_ms
        row["paired_ratio"] = timer.paired_ratio()
        row["ratio_of_medians"] = keras_ms / native_ms
        row["loss_rel_diff"] = abs(
            keras_side["first_loss"] - native["first_loss"]
        ) / abs(native["first_loss"])
    # The 2-D minimum is Keras's layout's (replicated over "batch"): its
    # local gradient elements, or the native side's FSDP2 shards' times the
    # "batch" axis if Keras failed.
    local = row["keras"].get("local_parameters")
    if local is None and "local_parameters" in native:
        local = native["local_parameters"] * max(world // 2, 1)
    row["minimum"] = minimum_collectives(setup, args.kind, world, local)
    per_rank = {
        "peak_rss_bytes": peak_rss_bytes(),
        "keras_param_bytes": row["keras"].get("param_bytes"),
        "keras_optimizer_bytes": row["keras"].get("optimizer_bytes"),
        "keras_cuda_peak_bytes": row["keras"].get("cuda_peak_bytes"),
        "native_param_bytes": native.get("param_bytes"),
        "native_optimizer_bytes": native.get("optimizer_bytes"),
        "native_cuda_peak_bytes": native.get("cuda_peak_bytes"),
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, per_rank)
    row["per_rank"] = gathered
    if RANK == 0:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
