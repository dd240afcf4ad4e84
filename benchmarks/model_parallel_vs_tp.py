"""Keras ModelParallel beside native PyTorch tensor parallelism, in one job.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 --rdzv-backend c10d \
        --rdzv-endpoint localhost:0 benchmarks/model_parallel_vs_tp.py

Both train the same MLP (512-4096-512, ReLU, MSE, SGD) on the same global
batch (128 rows, which every rank reads in full) from the same initial
weights, its first layer column-parallel and its second row-parallel:

- Keras: `ModelParallel` on a `(1, N)` mesh with axes `("batch", "model")`
  and the LayoutMap `up/kernel: (None, "model")`, `up/bias: ("model",)`,
  `down/kernel: ("model", None)`, `down/bias: (None,)` (replicated);
- TP: a `torch.nn.Sequential` of two `Linear`s, parallelized with
  `parallelize_module` (`ColwiseParallel`, then `RowwiseParallel`) on a 1-D
  mesh of the N ranks.

Both are timed over the same minutes: after warm-up, a callback times each
step of `fit` and then one TP step (forward, backward, optimizer step and
reading the loss), each after a barrier (`timing.InterleavedTimer`), and
each side's median is taken. Before that, each rank alone times Keras and
a plain torch loop on the MLP its shards make (hidden width / N), with no
distribution: Keras's own cost per step, which no distribution removes.
Each side's collectives of one training step (its last warm-up step) are
counted by kind, API and mesh axis, and the aten ops DTensor dispatched in
it (each costs sharding propagation). Rank 0 prints both times and their
ratio, the collective counts, the first-step loss of each side (they must
agree, else the job fails) and the largest weight difference after
training. Not a test: nothing here asserts a timing.

`--output-layout` also gives the second layer's output the data layout
(`layout_map["down/output"] = ("batch", None)`); `--trace` prints where each
collective comes from (autograd node, DTensor op, innermost Keras frames).
"""

import argparse
import collections
import os
import traceback

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.distributed.tensor.parallel import ColwiseParallel  # noqa: E402
from torch.distributed.tensor.parallel import RowwiseParallel  # noqa: E402
from torch.distributed.tensor.parallel import parallelize_module  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import keras  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
LEARNING_RATE = 0.01
# The two sides sum float32 partial products in different orders.
LOSS_RTOL = 1e-5

# Collectives as the dispatcher sees them: functional collectives (what
# DTensor issues when it redistributes) and c10d ops (what
# `torch.distributed.all_reduce` and its siblings issue).
_API_OF_NAMESPACE = {
    "_c10d_functional": "DTensor/funcol",
    "c10d_functional": "DTensor/funcol",
    "_dtensor": "DTensor/funcol",
    "c10d": "torch.distributed",
}
_KINDS = (
    ("all_reduce", ("all_reduce", "allreduce")),
    ("all_gather", ("all_gather", "allgather")),
    ("reduce_scatter", ("reduce_scatter",)),
    ("all_to_all", ("all_to_all", "alltoall")),
    ("broadcast", ("broadcast",)),
    ("send/recv", ("send", "recv")),
)
_GROUP_ARGUMENTS = ("group_name", "process_group", "group")


def _collective_kind(op):
    """Return e.g. `"all_reduce"` for a collective op, else None."""
    if op.namespace not in _API_OF_NAMESPACE:
        return None
    name = op._overloadpacket.__name__
    for kind, stems in _KINDS:
        if any(stem in name for stem in stems):
            return kind
    return None


def _group_name(op, args, kwargs):
    """The name of the process group a collective op runs on."""
    for index, argument in enumerate(op._schema.arguments):
        if argument.name not in _GROUP_ARGUMENTS:
            continue
        group = args[index] if index < len(args) else kwargs.get(argument.name)
        if isinstance(group, str):
            return group
        if isinstance(group, torch.ScriptObject):
            return dist.ProcessGroup.unbox(group).group_name
    return None


def _elements(args):
    """How many elements the tensor arguments of a collective hold."""
    total = 0
    for arg in args:
        for item in arg if isinstance(arg, (list, tuple)) else [arg]:
            if isinstance(item, torch.Tensor):
                total += item.numel()
    return total


def _axis_labels(mesh):
    """Map each axis's process group name of a torch mesh to a label."""
    labels = {}
    for axis, name in enumerate(mesh.mesh_dim_names):
        group = mesh.get_group(axis)
        ranks = group.size()
        labels[group.group_name] = (
            f"{name!r} ({ranks} rank{'s' if ranks > 1 else ''})"
        )
    return labels


def _keras_frames(stack, count=4):
    """The innermost `count` frames of a stack that are Keras source."""
    marker = os.path.join("keras", "src", "")
    frames = [
        f
        for f in stack
        if marker in f.filename and "traceback_utils" not in f.filename
    ]
    return frames[-count:]


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives run inside it by kind, API and mesh axis.

    A dispatch mode sees every op that reaches the dispatcher, forward and
    backward: an op on DTensors is handed on to DTensor first, and the
    collectives DTensor then issues come back here, as do the c10d ops of
    plain `torch.distributed` calls. (torch's `CommDebugMode` counts the
    same ops, but names no process group, and its module tracker fails
    inside a Keras `Functional` call: IndexError in its forward hook.)

    Args:
        labels: Process group name -> label, from `_axis_labels`.
        trace: Whether to keep where each collective came from.
    """

    def __init__(self, labels, trace=False):
        super().__init__()
        self.labels = labels
        self.trace = trace
        self.counts = collections.Counter()
        self.elements = collections.Counter()
        self.origins = []
        self.dtensor_ops = 0
        self._dtensor_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            self.dtensor_ops += 1
            self._dtensor_op = (func, args)
            return NotImplemented
        kind = _collective_kind(func)
        if kind is not None:
            group = _group_name(func, args, kwargs)
            key = (
                kind,
                _API_OF_NAMESPACE[func.namespace],
                self.labels.get(group, f"group {group}"),
            )
            self.counts[key] += 1
            self.elements[key] += _elements(args)
            if self.trace:
                self.origins.append((key, _elements(args), self._origin()))
        return func(*args, **kwargs)

    def _origin(self):
        """Lines saying where the collective being dispatched comes from."""
        lines = []
        node = torch._C._current_autograd_node()
        if node is not None:
            lines.append(f"in backward, autograd node {node.name()}")
        stack = traceback.extract_stack()[:-3]
        dispatch = os.path.join("distributed", "tensor", "_dispatch.py")
        if self._dtensor_op is not None and any(
            dispatch in f.filename for f in stack
        ):
            func, args = self._dtensor_op
            placements = [
                tuple(a.placements) for a in args if isinstance(a, DTensor)
            ]
            lines.append(f"redistributing the inputs of {func}: {placements}")
        for frame in _keras_frames(stack):
            lines.append(
                f"{frame.filename}:{frame.lineno} {frame.name}: {frame.line}"
            )
        return lines

    def summary(self):
        """One line per (kind, API, axis), then the count of DTensor ops."""
        lines = [
            f"{kind} over {axis}, {api}: {count} "
            f"({self.elements[(kind, api, axis)]:,} elements in)"
            for (kind, api, axis), count in sorted(self.counts.items())
        ] or ["no collective"]
        return lines + [f"({self.dtensor_ops} aten ops dispatched to DTensor)"]


def initial_weights(sizes, seed=0):
    """Keras-layout weights `[kernel, bias] * 2`, the same on every rank."""
    rng = np.random.default_rng(seed)
    weights = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        limit = np.sqrt(6 / (fan_in + fan_out))
        weights.append(rng.uniform(-limit, limit, (fan_in, fan_out)))
        weights.append(rng.uniform(-0.1, 0.1, (fan_out,)))
    return [w.astype("float32") for w in weights]


def warm_up(step, warmup, counter):
    """Run `warmup` steps, the last one inside `counter`.

    Args:
        step: A callable running one training step and returning its loss.
        warmup: How many steps to run, at least 2.
        counter: The `CollectiveCounter` for the last warm-up step.

    Returns:
        The first step's loss.
    """
    first_loss = step()
    for _ in range(warmup - 2):
        step()
    dist.barrier()
    with counter:
        step()
    return first_loss


class CountStep(keras.callbacks.Callback):
    """Counts the collectives of step `index` of `fit` with `counter`."""

    def __init__(self, counter, index):
        super().__init__()
        self.counter = counter
        self.index = index

    def on_train_batch_begin(self, batch, logs=None):
        if batch == self.index:
            self.counter.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.index:
            self.counter.__exit__(None, None, None)


def torch_tensor_parallel(weights, x, y, warmup, trace):
    """The MLP made tensor-parallel by `parallelize_module`, warmed up.

    Returns:
        The first step's loss, a callable running one more training step,
        the `CollectiveCounter` of one step, and a callable returning the
        weights in Keras layout.
    """
    mesh = init_device_mesh(
        "cpu", (dist.get_world_size(),), mesh_dim_names=("model",)
    )
    sizes = [weights[0].shape[0]] + [w.shape[0] for w in weights[1::2]]
    module = timing.torch_mlp(sizes)
    with torch.no_grad():
        for linear, kernel, bias in zip(
            (module[0], module[2]), weights[0::2], weights[1::2]
        ):
            linear.weight.copy_(torch.from_numpy(kernel.T))
            linear.bias.copy_(torch.from_numpy(bias))
    parallelize_module(
        module, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()}
    )
    step = timing.sgd_step(module, x, y, LEARNING_RATE)

    def final_weights():
        final = []
        for linear in (module[0], module[2]):
            final.append(linear.weight.full_tensor().detach().numpy().T)
            final.append(linear.bias.full_tensor().detach().numpy())
        return final

    counter = CollectiveCounter(_axis_labels(mesh), trace)
    first_loss = warm_up(step, warmup, counter)
    return first_loss, step, counter, final_weights


def time_one_shard_alone(x, y, sizes, steps, warmup):
    """Keras's own cost: each rank alone trains the MLP that its shards
    make (hidden width divided by the number of ranks) on the whole batch,
    with `fit` and no distribution, a plain torch step after each step.

    Returns:
        The median ms per step of Keras and of torch, and the median of
        their per-step ratios.
    """
    shard_sizes = (sizes[0], sizes[1] // dist.get_world_size(), sizes[2])
    module = timing.torch_mlp(shard_sizes)
    step = timing.sgd_step(module, x, y, LEARNING_RATE, warmup)
    model = timing.keras_mlp(shard_sizes)
    model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse")
    timer = timing.fit_side_by_side(model, x, y, steps, warmup, step)
    return (*timer.medians(), timer.paired_ratio())


def keras_model_parallel(
    weights, x, y, steps, warmup, output_layout, trace, native_step
):
    """Train the MLP with `ModelParallel` and `fit`, timing each step and
    one `native_step` after it (`timing.InterleavedTimer`).

    Returns:
        The first step's loss, the `InterleavedTimer`, the
        `CollectiveCounter` of one step, and the final weights.
    """
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(
        (1, len(devices)), ["batch", "model"], devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["up/kernel"] = (None, "model")
    layout_map["up/bias"] = ("model",)
    layout_map["down/kernel"] = ("model", None)
    layout_map["down/bias"] = (None,)
    if output_layout:
        layout_map["down/output"] = ("batch", None)
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    )
    sizes = (weights[0].shape[0], weights[0].shape[1], weights[2].shape[1])
    model = timing.keras_mlp(sizes, names=("up", "down"))
    model.set_weights(weights)
    model.compile(keras.optimizers.SGD(LEARNING_RATE), "mse")
    counter = CollectiveCounter(_axis_labels(mesh.backend_mesh), trace)
    # Counted first: the step counted is a warm-up step, which the timer
    # neither times nor follows with a native step.
    timer = timing.fit_side_by_side(
        model,
        x,
        y,
        steps,
        warmup,
        native_step,
        callbacks=[CountStep(counter, warmup - 1)],
    )
    return timer.first_loss, timer, counter, model.get_weights()


def print_origins(name, counter):
    print(f"where the collectives of one {name} step come from:")
    for (kind, api, axis), elements, lines in counter.origins:
        print(f"  {kind} over {axis}, {api}, {elements:,} elements")
        for line in lines:
            print(f"      {line}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="512,4096,512")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--output-layout",
        action="store_true",
        help='also set layout_map["down/output"] = ("batch", None)',
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="print where each counted collective comes from",
    )
    args = parser.parse_args()
    if args.warmup < 2:
        parser.error(
            "--warmup must be at least 2: the collectives of the last "
            f"warm-up step are counted. Received: --warmup {args.warmup}"
        )
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 3:
        parser.error(
            "--sizes takes three layer widths, input,hidden,output. "
            f"Received: --sizes {args.sizes}"
        )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(args.batch, sizes[0])).astype("float32")
    y = rng.normal(size=(args.batch, sizes[2])).astype("float32")
    weights = initial_weights(sizes)
    keras.distribution.list_devices()  # Forms the world under torchrun.
    # TP is built and warmed up first: once Keras has made a DTensor, its
    # promotion handler (keras/src/backend/torch/dtensor_promotion.py) sees
    # every DTensor call; `timing` restores DTensor's own while a TP step
    # runs.
    alone, alone_torch, alone_ratio = time_one_shard_alone(
        x, y, sizes, args.steps, args.warmup
    )
    tp_loss, tp_step, tp_counter, tp_final = torch_tensor_parallel(
        weights, x, y, args.warmup, args.trace
    )
    ours_loss, timer, ours_counter, ours_weights = keras_model_parallel(
        weights,
        x,
        y,
        args.steps,
        args.warmup,
        args.output_layout,
        args.trace,
        tp_step,
    )
    ours_ms, tp_ms = timer.medians()
    with timing.without_promotion():
        tp_weights = tp_final()
    loss_diff = abs(ours_loss - tp_loss) / abs(tp_loss)
    weight_diff = max(
        float(np.max(np.abs(a - b))) for a, b in zip(ours_weights, tp_weights)
    )
    weight_max = max(float(np.max(np.abs(w))) for w in tp_weights)
    if RANK == 0:
        layout = ' + "down/output"' if args.output_layout else ""
        print(
            f"MLP {args.sizes}, global batch {args.batch}, "
            f"{dist.get_world_size()} ranks, mesh (1, "
            f"{dist.get_world_size()}), {args.steps} steps (median)\n"
            f"  torch TP:              {tp_ms:8.2f} ms/step\n"
            f"  keras ModelParallel:   {ours_ms:8.2f} ms/step{layout}\n"
            f"  ratio keras / TP:      {timer.paired_ratio():8.3f} (median of "
            f"per-step ratios; of the medians: {ours_ms / tp_ms:.3f})\n"
            f"each rank alone, its shards' MLP on the whole batch, no "
            "communication (Keras's own cost):\n"
            f"  torch:                 {alone_torch:8.2f} ms/step\n"
            f"  keras:                 {alone:8.2f} ms/step\n"
            f"  ratio keras / torch:   {alone_ratio:8.3f} (of the medians: "
            f"{alone / alone_torch:.3f})\n"
            f"first-step loss: torch TP {tp_loss:.7f}, keras "
            f"{ours_loss:.7f} (relative difference {loss_diff:.1e})\n"
            f"weights after {args.steps + args.warmup} steps: largest "
            f"difference {weight_diff:.1e} (largest weight {weight_max:.3f})"
        )
        print("collectives in one training step:")
        for name, counter in (
            ("torch TP", tp_counter),
            ("keras ModelParallel", ours_counter),
        ):
            print(f"  {name}:")
            for line in counter.summary():
                print(f"    {line}")
        if args.trace:
            print_origins("torch TP", tp_counter)
            print_origins("keras ModelParallel", ours_counter)
    if not loss_diff <= LOSS_RTOL:
        raise RuntimeError(
            f"The first-step losses differ: torch TP {tp_loss!r}, keras "
            f"{ours_loss!r} (relative difference {loss_diff:.1e}, more "
            f"than {LOSS_RTOL:.0e}). Both start from the same weights and "
            "data, so the two sides do not compute the same model."
        )


if __name__ == "__main__":
    main()
