"""Forming and tearing down the `torch.distributed` world.

The world is formed once per process, from `torchrun`'s environment or from
`keras.distribution.initialize()` arguments. At exit, a process that
finished cleanly waits for the others and destroys the process group, so a
job that succeeded exits 0 on every rank (gloo can abort a rank whose peers
leave first). A process that dies of an exception skips that barrier: its
peers then fail fast on the closed connection instead of waiting for it.
"""

import atexit
import datetime
import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist

from keras.src.backend.torch import torch_internals
from keras.src.utils import rng_utils

_TIMEOUT_ENV = "KERAS_TORCH_DISTRIBUTED_TIMEOUT"
_DEFAULT_TIMEOUT_SECONDS = 600
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

_state = {"teardown_registered": False, "failed": False}


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def is_multi_process():
    return is_initialized() and dist.get_world_size() > 1


def _launched_by_torchrun():
    return all(name in os.environ for name in _TORCHRUN_ENV)


def maybe_initialize_from_environment():
    """Form the world when launched by `torchrun` and not formed yet."""
    if not is_initialized() and _launched_by_torchrun():
        initialize()


def _timeout():
    seconds = os.environ.get(_TIMEOUT_ENV, _DEFAULT_TIMEOUT_SECONDS)
    try:
        seconds = float(seconds)
    except ValueError:
        raise ValueError(
            f"{_TIMEOUT_ENV} must be a number of seconds. Received: "
            f"{_TIMEOUT_ENV}={seconds!r}"
        )
    return datetime.timedelta(seconds=seconds)


def _backend():
    return "nccl" if torch.cuda.is_available() else "gloo"


def _coordinator(job_addresses, num_processes):
    addresses = [a.strip() for a in job_addresses.split(",") if a.strip()]
    if len(addresses) > 1 and num_processes not in (None, len(addresses)):
        raise ValueError(
            f"`job_addresses` lists {len(addresses)} jobs but "
            f"`num_processes` is {num_processes}. Received: "
            f"job_addresses={job_addresses!r}, num_processes={num_processes}"
        )
    if len(addresses) > 1 and num_processes is None:
        num_processes = len(addresses)
    return addresses[0], num_processes


def _check_same_world(num_processes, process_id):
    world, rank = dist.get_world_size(), dist.get_rank()
    if num_processes is not None and num_processes != world:
        raise ValueError(
            f"The torch.distributed world is already formed with {world} "
            f"processes, but `initialize()` received num_processes="
            f"{num_processes}."
        )
    if process_id is not None and process_id != rank:
        raise ValueError(
            f"This process is already rank {rank}, but `initialize()` "
            f"received process_id={process_id}."
        )


def initialize(job_addresses=None, num_processes=None, process_id=None):
    """Form the world; see `distribution_lib.initialize`."""
    if is_initialized():
        _check_same_world(num_processes, process_id)
        return
    if job_addresses:
        coordinator, num_processes = _coordinator(job_addresses, num_processes)
        init_method = f"tcp://{coordinator}"
    elif "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        coordinator = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        init_method = "env://"
    else:
        coordinator = None
    if num_processes is None:
        num_processes = int(os.environ.get("WORLD_SIZE", 1))
    if process_id is None:
        process_id = int(os.environ.get("RANK", 0))
    if coordinator is None:
        if num_processes > 1:
            raise ValueError(
                f"Cannot form a world of {num_processes} processes without "
                "a coordinator address. Pass `job_addresses=` (or set "
                "KERAS_DISTRIBUTION_JOB_ADDRESSES), or launch with "
                "`torchrun`."
            )
        return
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"`process_id` must be in [0, {num_processes}). Received: "
            f"process_id={process_id}, num_processes={num_processes}"
        )
    backend = _backend()
    if backend == "nccl":
        use_local_cuda_device(process_id)
    store = None
    if init_method == "env://" and _restarted_by_torchrun():
        store = _store_of_this_attempt(num_processes)
    try:
        dist.init_process_group(
            backend,
            init_method=None if store else init_method,
            store=store,
            world_size=num_processes,
            rank=process_id,
            timeout=_timeout(),
        )
    except Exception as error:
        raise RuntimeError(
            f"Could not form the torch.distributed world as rank "
            f"{process_id} of {num_processes} (coordinator {coordinator}, "
            f"backend {backend}): {error}"
        ) from error
    _register_teardown()
    name_process_in_warnings()
    _agree_on_random_seed()


def use_local_cuda_device(rank=None):
    """Make this process's current CUDA device its own, once.

    The device is `LOCAL_RANK`'s (set by torchrun, and by most launchers),
    else the rank modulo the host's device count: ranks are laid out host
    by host. It runs whoever formed the world (torchrun, `initialize()`, or
    the user's own `init_process_group`), before the first mesh is made, so
    that NCCL and the variables use one device per process rather than
    every process using device 0.

    Args:
        rank: This process's rank; defaults to the formed world's.
    """
    if _state.get("cuda_device_set") or not torch.cuda.is_available():
        return
    _state["cuda_device_set"] = True
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        if rank is None:
            rank = dist.get_rank() if is_initialized() else 0
        local_rank = rank % torch.cuda.device_count()
    torch.cuda.set_device(int(local_rank))


def name_process_in_warnings():
    """Begin every warning this process prints with `[process N] `.

    Every rank runs the same script, so without it the same warning
    appears once per rank with nothing saying whose it is. Idempotent;
    nothing changes in a world of one process.
    """
    original = warnings.formatwarning
    if getattr(original, "names_process", False) or not is_multi_process():
        return

    # Read once: a warning printed after the teardown below, when the
    # process group is gone, must not fail asking for the rank.
    rank = dist.get_rank()

    def formatwarning(message, category, filename, lineno, line=None):
        text = original(message, category, filename, lineno, line)
        return f"[process {rank}] {text}"

    formatwarning.names_process = True
    warnings.formatwarning = formatwarning


def _restarted_by_torchrun():
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and (
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    )


def _store_of_this_attempt(num_processes):
    """The agent's store, under a prefix of this restart attempt's own.

    After `torchrun --max-restarts` restarts the workers, they meet in the
    same agent store as the attempt before, whose gloo addresses are still
    there: a rank that reads a dead peer's address fails to connect. A
    prefix per attempt keeps each attempt's keys apart.
    """
    tcp_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        num_processes,
        is_master=False,
        timeout=_timeout(),
    )
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    return dist.PrefixStore(f"keras/attempt_{attempt}/", tcp_store)


def ensure_process_group():
    """Make sure a process group exists, forming a 1-process one if needed.

    DTensor needs a default process group even for a mesh of one device.
    """
    if is_initialized():
        return
    maybe_initialize_from_environment()
    if is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(
        backend, store=dist.HashStore(), rank=0, world_size=1
    )
    _register_teardown()


def _agree_on_random_seed():
    """Give every process the same global seed unless the user set one.

    As on JAX, this makes initializers and random layers draw the same
    values on every process.
    """
    if rng_utils.get_random_seed() is not None:
        return
    from keras.src.backend.torch import cross_rank

    seed = int.from_bytes(os.urandom(4), "little") >> 1
    rng_utils.set_random_seed(cross_rank.broadcast_int(seed, src=0))


def _register_teardown():
    if _state["teardown_registered"]:
        return
    _state["teardown_registered"] = True
    previous_hook = sys.excepthook

    def note_failure(error_type, error, traceback):
        _state["failed"] = True
        previous_hook(error_type, error, traceback)
        hint = collective_failure_hint(error)
        if hint:
            print(hint, file=sys.stderr, flush=True)

    sys.excepthook = note_failure
    atexit.register(_teardown)


# How gloo, NCCL and the c10d store say that a peer died or a collective
# timed out.
_COLLECTIVE_FAILURES = (
    "by peer",
    "Application timeout caused pair closure",
    "Timed out waiting",
    "collective operation timeout",
    "DistNetworkError",
    "Connection was likely closed",
    "NCCL communicator was aborted",
)


def collective_failure_hint(error):
    """What to tell the user when `error` is a failed collective.

    Args:
        error: The exception that ends the process.

    Returns:
        A message naming this rank, the likely cause and the timeout
        setting, or None when `error` is not a collective's failure.
    """
    text = f"{type(error).__name__}: {error}"
    if not any(marker in text for marker in _COLLECTIVE_FAILURES):
        return None
    rank = dist.get_rank() if is_initialized() else "?"
    return (
        f"keras.distribution: rank {rank} failed in a collective operation "
        "that another rank did not complete: that rank most likely died or "
        "is stuck (look for the first error in the other ranks' logs; "
        "under torchrun, in its failure summary). A collective that does "
        f"not complete fails after {_TIMEOUT_ENV}="
        f"{_timeout().total_seconds():g} seconds (default "
        f"{_DEFAULT_TIMEOUT_SECONDS})."
    )


def _teardown():
    if not is_initialized():
        return
    try:
        if not _state["failed"] and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()
        # NOTE [gloo at exit]: `destroy_process_group` shuts groups down,
        # but each torch mesh still holds its groups (meshes live on in
        # caches and in DTensor variables), so the groups, and gloo's
        # worker threads, lived until the interpreter's finalization. A
        # worker thread that was still dropping the barrier's work then
        # (its tensors need the GIL, which a finalizing interpreter no
        # longer hands out) was unwound inside a destructor and the
        # process aborted ("terminate called without an active
        # exception", SIGABRT: 1 run in 8 to 36 of a mesh test on a loaded
        # 2-core machine). Dropped here, while the interpreter is whole,
        # the groups are destroyed and their threads joined.
        torch_internals.release_mesh_process_groups()
        gc.collect()
