"""The one way the suite launches multi-process runs.

`run_workers` starts `torchrun` on a worker script with a free port
(`--rdzv-endpoint localhost:0`), one OpenMP thread per rank, and a hard
timeout that kills the whole process group. Every rank's output is kept and
shown when a run fails. Each rank writes its results to `rank{N}.npz` in a
results folder the test then reads.

`run_by_hand` starts plain processes that form the world from the
environment a cluster's own launcher would give them, and `run_hosts`
starts one torchrun agent per "host", all on this machine. Both can leave
some processes running (a stuck rank, a host killed on purpose) and report
which; `leftover_processes` finds any process a launch left behind.
"""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

WORKERS = Path(__file__).parent / "workers"
DEFAULT_TIMEOUT = 240


class LaunchError(AssertionError):
    """A launched run failed, hung, or left no results."""


def _environment(results_dir, extra_env=None):
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="torch",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        # A rank that crashes (SIGSEGV, SIGABRT) prints every thread's
        # Python stack before it dies, into the output a failure shows.
        PYTHONFAULTHANDLER="1",
        RESULTS_DIR=str(results_dir),
        # Make a collective that can never complete fail instead of hang.
        KERAS_TORCH_DISTRIBUTED_TIMEOUT=env.get(
            "KERAS_TORCH_DISTRIBUTED_TIMEOUT", "120"
        ),
    )
    # Never let the repository's own `keras/` folder shadow the install.
    env.pop("PYTHONPATH", None)
    env.update(extra_env or {})
    return env


def _run(command, results_dir, timeout, extra_env=None):
    process = subprocess.Popen(
        command,
        cwd=results_dir,
        env=_environment(results_dir, extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in a session of its own: killing
        # torchrun's process group alone would leave them running.
        kill_tree(process.pid)
        output, _ = process.communicate()
        raise LaunchError(
            f"Run timed out after {timeout}s and was killed: {command}\n"
            f"--- output so far ---\n{output}"
        )
    return process.returncode, output


def run_workers(
    script,
    nproc,
    tmp_path,
    args=(),
    timeout=DEFAULT_TIMEOUT,
    expect_success=True,
    env=None,
    torchrun_args=(),
):
    """Run `workers/<script>` under torchrun on `nproc` ranks.

    Args:
        script: File name in `workers/`.
        nproc: Number of ranks.
        tmp_path: Folder for results (a pytest `tmp_path`).
        args: Extra command-line arguments for the worker.
        timeout: Seconds before the whole process group is killed.
        expect_success: If True, a non-zero exit raises `LaunchError`.
        env: Extra environment variables for every rank.
        torchrun_args: Extra arguments for torchrun (`--max-restarts=1`).

    Returns:
        `(returncode, output, results)` where `results` is a list with one
        dict of arrays per rank (empty for ranks that wrote none).
    """
    results_dir = Path(tmp_path) / f"{Path(script).stem}-{nproc}"
    results_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        "--tee=3",
        *torchrun_args,
        str(WORKERS / script),
        *args,
    ]
    returncode, output = _run(command, results_dir, timeout, env)
    if expect_success and returncode != 0:
        raise LaunchError(
            f"{script} on {nproc} ranks exited with {returncode}.\n"
            f"--- output of every rank ---\n{output}"
        )
    results = []
    for rank in range(nproc):
        path = results_dir / f"rank{rank}.npz"
        results.append(dict(np.load(path)) if path.exists() else {})
    if expect_success and not all(results):
        raise LaunchError(f"{script}: some ranks wrote no results.\n{output}")
    return returncode, output, results


def run_reference(script, tmp_path, args=(), timeout=DEFAULT_TIMEOUT):
    """Run `workers/<script>` as one plain process, without torchrun.

    Returns:
        The dict of arrays the script saved as `rank0.npz`.
    """
    results_dir = Path(tmp_path) / f"{Path(script).stem}-reference"
    results_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(WORKERS / script), *args]
    returncode, output = _run(command, results_dir, timeout)
    if returncode != 0:
        raise LaunchError(
            f"Reference run of {script} exited with {returncode}.\n{output}"
        )
    return dict(np.load(results_dir / "rank0.npz"))


def assert_every_rank_printed(output, message, nproc=2):
    """Each of `nproc` ranks printed `message` (on a `[rankN]` line)."""
    for rank in range(nproc):
        lines = [
            line for line in output.splitlines() if f"[rank{rank}]" in line
        ]
        assert any(message in line for line in lines), (rank, output)


def free_port():
    """A TCP port of 127.0.0.1 free now (bound to port 0, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children():
    """`{pid: [pid of each child]}` of every process, read from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces.
        parent = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def _alive(pid):
    """Whether process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_tree(pid, wait=10):
    """SIGKILL process `pid`, its process group and every process under it,
    whatever their sessions (torchrun starts each worker in its own), and
    wait up to `wait` seconds for them to be gone."""
    children = _children()
    tree = [pid]
    for member in tree:
        tree.extend(children.get(member, []))
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.time() + wait
    while any(_alive(member) for member in tree) and time.time() < deadline:
        time.sleep(0.05)


def leftover_processes(results_dir):
    """The live processes of a launch into `results_dir`.

    Every process a launch starts, and every worker torchrun starts in
    turn, has `RESULTS_DIR=<results_dir>` in its environment.

    Returns:
        `{pid: command line}`.
    """
    marker = f"RESULTS_DIR={results_dir}".encode()
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        pid = int(proc.name)
        if marker in environ and pid != os.getpid() and _alive(pid):
            command = command.replace(b"\0", b" ").decode(errors="replace")
            found[pid] = command.strip()
    return found


@dataclasses.dataclass
class Exit:
    """How one process of `run_by_hand` or `run_hosts` ended.

    Attributes:
        returncode: Its exit status; minus the signal that killed it.
        ended: `time.time()` when it was seen to end (polled every 0.05
            s), or None if it was still running once the awaited processes
            had ended, and was killed then.
        output: Everything it printed.
    """

    returncode: int
    ended: float | None
    output: str


@dataclasses.dataclass
class Launch:
    """The outcome of `run_by_hand` or `run_hosts`.

    Attributes:
        exits: One `Exit` per process started (rank or host).
        left: `{pid: command line}` of the processes of the launch still
            running once the awaited processes had ended (all since
            killed).
        killed_at: `time.time()` when a host was killed on request.
        results: One dict of arrays per rank (empty if it wrote none).
        results_dir: The folder of the launch.
    """

    exits: list
    left: dict
    killed_at: float | None
    results: list
    results_dir: Path

    def report(self):
        """Every process's output, for assertion messages."""
        return "\n".join(
            f"--- process {i}: exit {e.returncode} ---\n{e.output}"
            for i, e in enumerate(self.exits)
        )


def _start(command, results_dir, name, env):
    with open(results_dir / f"{name}.log", "w") as log:
        return subprocess.Popen(
            command,
            cwd=results_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _supervise(processes, results_dir, timeout, wait_for, nranks, kill):
    """Wait for the processes `wait_for` to end, then kill what is left.

    Args:
        processes: The started `Popen`s; process `i` logs to `{i}.log`.
        results_dir: The launch's folder.
        timeout: Seconds before everything is killed and `LaunchError`
            raised.
        wait_for: Indices of the processes to wait for.
        nranks: Number of ranks, whose results to read.
        kill: None, or `(index, path)`: kill process `index` and every
            process under it as soon as file `path` exists.

    Returns:
        A `Launch`.
    """
    deadline = time.time() + timeout
    ended, killed_at = {}, None
    while not all(i in ended for i in wait_for):
        now = time.time()
        for i, process in enumerate(processes):
            if i not in ended and process.poll() is not None:
                ended[i] = now
        if kill and killed_at is None and Path(kill[1]).exists():
            kill_tree(processes[kill[0]].pid)
            killed_at = time.time()
        if now > deadline:
            for process in processes:
                kill_tree(process.pid)
            for pid in leftover_processes(results_dir):
                kill_tree(pid)
            outputs = "\n".join(
                f"--- process {i} ---\n{(results_dir / f'{i}.log').read_text()}"
                for i in range(len(processes))
            )
            raise LaunchError(
                f"Processes {sorted(set(wait_for) - set(ended))} were still "
                f"running after {timeout}s; all were killed.\n{outputs}"
            )
        time.sleep(0.05)
    left = leftover_processes(results_dir)
    for pid in left:
        kill_tree(pid)
    exits = []
    for i, process in enumerate(processes):
        if process.poll() is None:
            kill_tree(process.pid)
        returncode = process.wait()
        output = (results_dir / f"{i}.log").read_text()
        exits.append(Exit(returncode, ended.get(i), output))
    results = []
    for rank in range(nranks):
        path = results_dir / f"rank{rank}.npz"
        results.append(dict(np.load(path)) if path.exists() else {})
    return Launch(exits, left, killed_at, results, results_dir)


def run_by_hand(
    script, nproc, tmp_path, args=(), env=None, timeout=120, wait_for=None
):
    """Run `workers/<script>` as `nproc` plain processes, without torchrun.

    Each process gets the environment a cluster's own launcher gives it
    (`MASTER_ADDR`, `MASTER_PORT` of a free port, `RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`), and forms the world itself on first use of
    `keras.distribution`; rank 0 hosts the store.

    Args:
        script: File name in `workers/`.
        nproc: Number of ranks.
        tmp_path: Folder for results (a pytest `tmp_path`).
        args: Extra command-line arguments for the worker.
        env: Extra environment variables for every rank.
        timeout: Seconds before every process is killed and `LaunchError`
            raised.
        wait_for: The ranks to wait for (default: all); once they have
            ended, the others are killed.

    Returns:
        A `Launch` with one `Exit` per rank.
    """
    results_dir = Path(tmp_path) / f"{Path(script).stem}-by-hand-{nproc}"
    results_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes = []
    for rank in range(nproc):
        rank_env = _environment(results_dir, env)
        rank_env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(nproc),
            LOCAL_RANK=str(rank),
        )
        command = [sys.executable, str(WORKERS / script), *args]
        processes.append(_start(command, results_dir, rank, rank_env))
    wait_for = range(nproc) if wait_for is None else wait_for
    return _supervise(processes, results_dir, timeout, wait_for, nproc, None)


def run_hosts(
    script,
    nnodes,
    nproc_per_node,
    tmp_path,
    args=(),
    env=None,
    timeout=DEFAULT_TIMEOUT,
    kill=None,
    wait_for=None,
):
    """Run `workers/<script>` on `nnodes` "hosts", all on this machine.

    Each host is one torchrun agent (`--nnodes`, `--nproc-per-node`), as on
    a cluster; the agents meet at a c10d rendezvous on a free port of
    127.0.0.1, whose store host 0's agent hosts (`is_host`). The
    rendezvous, not the order of launch, gives each host its node rank
    (and so its workers' ranks).

    Args:
        script: File name in `workers/`.
        nnodes: Number of hosts.
        nproc_per_node: Number of ranks per host.
        tmp_path: Folder for results (a pytest `tmp_path`).
        args: Extra command-line arguments for the worker.
        env: Extra environment variables for every rank.
        timeout: Seconds before every process is killed and `LaunchError`
            raised.
        kill: None, or `(host, path)`: once file `path` exists, kill that
            host as a machine dies: its agent and its workers, SIGKILL.
        wait_for: The hosts to wait for (default: all); once their agents
            have ended, the other hosts are killed.

    Returns:
        A `Launch` with one `Exit` per host.
    """
    name = f"{Path(script).stem}-hosts-{nnodes}x{nproc_per_node}"
    results_dir = Path(tmp_path) / name
    results_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"127.0.0.1:{free_port()}"
    run_id = uuid.uuid4().hex
    processes = []
    for host in range(nnodes):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={run_id}",
            f"--rdzv-conf=is_host={int(host == 0)}",
            "--tee=3",
            str(WORKERS / script),
            *args,
        ]
        host_env = _environment(results_dir, env)
        processes.append(_start(command, results_dir, host, host_env))
    wait_for = range(nnodes) if wait_for is None else wait_for
    nranks = nnodes * nproc_per_node
    return _supervise(processes, results_dir, timeout, wait_for, nranks, kill)
