"""Run upstream Keras's own test modules against the installed fork.

The modules ship in the keras wheel. They run here with the torch backend
as regression tests for the upstream files our patches touch and for the
behaviour our modules must not change. pytest runs in a subprocess, from a
neutral working directory (so that this repository's `keras/` folder and
`conftest.py` stay out of the way), with `conftest_plugin.py` standing in
for upstream's repository-level `conftest.py`. pytest's output is passed
through; the exit status is pytest's.

Usage:

    python tests/upstream/run_upstream_tests.py [--quick] [pytest args...]

`--quick` leaves out the `torch.compile` (`jit_compile=True`) variants of
`trainer_test`, which take about half of the run time on CPU.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Upstream test modules run, each with what it covers for us.
MODULES = {
    "keras.src.distribution.distribution_lib_test": "the distribution API",
    "keras.src.backend.torch.core_test": "torch core.py (patched)",
    "keras.src.backend.common.variables_test": "torch Variable (patched)",
    "keras.src.callbacks.callback_test": "callback_list.py (patched)",
    "keras.src.trainers.data_adapters.array_data_adapter_test": "arrays",
    "keras.src.trainers.data_adapters.data_adapter_utils_test": (
        "get_data_adapter (data_adapters/__init__.py patched)"
    ),
    "keras.src.trainers.data_adapters.generator_data_adapter_test": "gens",
    "keras.src.trainers.data_adapters.grain_dataset_adapter_test": "grain",
    "keras.src.trainers.data_adapters.py_dataset_adapter_test": "PyDataset",
    "keras.src.trainers.data_adapters.tf_dataset_adapter_test": "tf.data",
    "keras.src.trainers.data_adapters.torch_data_loader_adapter_test": (
        "torch DataLoader"
    ),
    "keras.src.trainers.epoch_iterator_test": "epoch iteration",
    "keras.src.trainers.compile_utils_test": "compiled losses and metrics",
    "keras.src.trainers.trainer_test": "fit/evaluate/predict (patched)",
    "keras.src.optimizers.optimizer_test": "torch_optimizer.py (patched)",
    "keras.src.optimizers.sgd_test": "SGD on torch",
    "keras.src.optimizers.adam_test": "Adam on torch",
    "keras.src.optimizers.adamw_test": "AdamW on torch",
    "keras.src.optimizers.loss_scale_optimizer_test": "loss scaling",
    "keras.src.optimizers.multi_optimizer_test": "several optimizers",
    "keras.src.optimizers.optimizer_sparse_test": "sparse updates",
    "keras.src.models.model_test": "Model end to end",
    "keras.src.ops.nn_test": "torch nn.py (patched: sparse cross-entropy)",
    "keras.src.losses.losses_test": "losses on torch",
    "keras.src.layers.core.dense_test": "Dense (patched: bias in the product)",
    "keras.src.layers.layer_test": "torch layer.py (patched)",
}

# Packages the modules import (mostly at module level, to build inputs:
# tf.data datasets, jax arrays, data frames, sparse matrices, grain
# datasets). They are pinned in requirements-test.txt.
REQUIRED_PACKAGES = ("tensorflow", "jax", "pandas", "scipy", "grain")

# Tests deselected, as pytest node id prefixes relative to the directory
# holding the `keras` package, each with a one-line reason: tests that also
# fail, or cannot apply, on pristine upstream keras 3.15.1 with the torch
# backend, and intended differences of the fork.
DESELECTED = {
    "keras/src/trainers/data_adapters/data_adapter_utils_test.py"
    "::TestMultiWorkerValidation::test_unsupported_type_multi_worker": (
        "intended difference: on torch the fork accepts every input type "
        "in multi-process runs (each rank reads the global batches and the "
        "trainer shards them), where upstream demands a tf.data.Dataset; "
        "integration_tests/torch_distributed/test_data_parallel.py covers "
        "generators, PyDataset and DataLoader"
    ),
}

# Left out by `--quick`: trainer_test's torch.compile variants.
QUICK_KEYWORD = "not _jit"


def _keras_parent():
    """Finds the directory holding the `keras` package, without importing.

    Returns:
        The directory, as a string.

    Raises:
        SystemExit: If keras is not importable.
    """
    spec = importlib.util.find_spec("keras")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("keras is not importable from this interpreter.")
    return str(Path(list(spec.submodule_search_locations)[0]).parent)


def _missing_packages():
    """Lists the packages from `REQUIRED_PACKAGES` that are not installed.

    Returns:
        A list of package names.
    """
    return [
        name
        for name in REQUIRED_PACKAGES
        if importlib.util.find_spec(name) is None
    ]


def build_command(argv):
    """Builds the pytest command line.

    Args:
        argv: Arguments for this script: `--quick` and/or extra pytest
            arguments.

    Returns:
        The command, as a list.
    """
    quick = "--quick" in argv
    extra = [arg for arg in argv if arg != "--quick"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "conftest_plugin",
        # No ini file from wherever keras is installed applies.
        "-c",
        os.devnull,
        "--rootdir",
        _keras_parent(),
        # Nor a conftest.py above it, e.g. this repository's when the
        # virtual environment lives inside the checkout (.venv/).
        "--confcutdir",
        _keras_parent(),
        "-q",
        "-rfE",
        "--disable-warnings",
    ]
    for node_id in DESELECTED:
        command += ["--deselect", node_id]
    if quick:
        command += ["-k", QUICK_KEYWORD]
    return command + [*extra, "--pyargs", *MODULES]


def main(argv):
    """Runs the upstream modules; returns pytest's exit status.

    Args:
        argv: Arguments for this script (see the module docstring).

    Returns:
        pytest's exit status (4 if a required package is missing).
    """
    missing = _missing_packages()
    if missing:
        print(
            f"Missing test dependencies: {', '.join(missing)}. Install them "
            "with `pip install -r requirements-test.txt`.",
            file=sys.stderr,
        )
        return 4
    for node_id, reason in DESELECTED.items():
        print(f"deselected {node_id}: {reason}")
    env = dict(os.environ, KERAS_BACKEND="torch")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [env.get("PYTHONPATH"), str(HERE)])
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as neutral:
        return subprocess.call(build_command(argv), cwd=neutral, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
