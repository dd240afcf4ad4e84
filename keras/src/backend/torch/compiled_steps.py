"""`jit_compile=True` on the torch backend: steps that torch.compile can
compile, under a distribution as in one process.

The trainer compiles its step functions with `compile_step`, runs the
loss's backward through `backward`, and hands metrics `for_metrics(y_pred)`.

NOTE [compiled steps]: Keras's torch trainer compiles the whole step
(`torch.compile` of the function that shards the batch and calls
`train_step`). Dynamo cannot trace `loss.backward()`, so the step is always
split there: one compiled graph runs the forward and the loss, the
autograd engine then runs that graph's compiled backward (AOTAutograd
makes it) and the gradient hooks, eagerly, and a second graph runs the
optimizer's update. What makes that work on DTensors:

- The backward runs with dynamo off (`backward`). Otherwise every Python
  frame the autograd engine enters on this thread is compiled as it comes:
  gradient hooks (`distributed_gradients` queues its bucketed all-reduces
  from them), FSDP-style reduce-scatters, and the AOTAutograd wrappers that
  rebuild DTensors from local tensors, whose frames were recompiled for
  every rank of tensor until dynamo's recompile limit (8) made it give up
  on them.
- A graph's outputs that require gradients but get none must not be
  DTensors: AOTAutograd guesses each output's gradient to be of its
  output's type, and the autograd engine fills a missing gradient with
  plain zeros, which it rejects ("Expected a DTensor tangent but got a
  plain Tensor"). The predictions outlive the forward graph only for the
  metrics, which need no gradient, so the trainer detaches them first
  (`for_metrics`).
- Under a distribution, shapes are static (`dynamic=False`). After a
  frame recompiles for a new shape, dynamo makes that size symbolic, and
  DTensor's sharding propagation cannot take symbolic sizes ("unhashable
  type: non-nested SymInt"). A batch of a new size (an uneven last batch)
  compiles the step once more instead.
- Under a distribution, each rank keeps its own inductor cache
  (`TORCHINDUCTOR_CACHE_DIR`, a `rank<N>` folder in it). The cache's key
  holds a DTensor's global shape, not its local one: when a batch is
  uneven, ranks on one host sharing a cache ran each other's graphs, and
  failed ("expected size 6==7" on a 13-row batch over 2 ranks).
- Under a distribution, dynamo may compile a function `RECOMPILE_LIMIT`
  (64) times, not 8: FSDP-style gathers split the step at every layer
  (below), so each layer's call is compiled on its own, once per layer
  and batch size, and with 8 the later layers ran eagerly.

Collectives that run inside compiled code use the functional collectives
(`dtensor_utils`): inductor cannot compile the in-place
`torch.distributed` ops. Hooks whose collectives are best run as they are
(the FSDP-style gathers of `layer_gathers`) are `torch.compiler.disable`d,
a graph break on each side.
"""

import os

import torch

from keras.src import tree
from keras.src.backend.torch import torch_internals

# Dynamo's limit of compiled versions per function, under a distribution.
RECOMPILE_LIMIT = 64


def compile_step(function):
    """`torch.compile(function)`, with static shapes under a distribution.

    Args:
        function: A step function (`one_step_on_data`).

    Returns:
        The compiled function.
    """
    from keras.src.backend.torch import distribution_lib

    if distribution_lib.active_distribution() is None:
        return torch.compile(function)
    _use_cache_of_this_rank(distribution_lib.process_id())
    compiled = torch.compile(function, dynamic=False)

    def step(*args, **kwargs):
        with torch_internals.recompile_limit(RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return step


def _use_cache_of_this_rank(rank):
    """Point inductor's cache at a folder of this rank's own, once."""
    folder = f"rank{rank}"
    shared = torch_internals.inductor_cache_dir()
    if os.path.basename(shared) != folder:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(shared, folder)


def backward(loss):
    """`loss.backward()`; in a compiled step, with dynamo off while it runs.

    Eagerly it is the plain call: dynamo is not running, and its wrapper
    (which swaps dynamo's frame callback around the call) would add
    nothing but a layer between the trainer and the autograd engine.
    """
    if torch.compiler.is_compiling():
        _backward_without_dynamo(loss)
    else:
        loss.backward()


@torch.compiler.disable
def _backward_without_dynamo(loss):
    loss.backward()


def for_metrics(y_pred):
    """The predictions, detached: what metrics read after the backward."""
    return tree.map_structure(
        lambda x: x.detach() if isinstance(x, torch.Tensor) else x, y_pred
    )
