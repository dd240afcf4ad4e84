"""The one way the suite launches multi-process runs.

`run_workers` starts `torchrun` on a worker script with a free port
(`--rdzv-endpoint localhost:0`), one OpenMP thread per rank, and a hard
timeout that kills the whole process group. Every rank's output is kept and
shown when a run fails. Each rank writes its results to `rank{N}.npz` in a
results folder the test then reads.
"""

import os
import signal
import subprocess
import sys
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
        os.killpg(process.pid, signal.SIGKILL)
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
