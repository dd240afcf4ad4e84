"""Run upstream Keras's own test modules against the installed fork.

The modules ship in the keras wheel; they run here with the torch backend,
as regression tests for the upstream files our patches touch and the
behaviour our modules must not change. Exits with pytest's exit code.

    python tests/upstream/run_upstream_tests.py [extra pytest arguments]
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# What each module covers, for a reader choosing what to add.
MODULES = {
    "keras.src.distribution.distribution_lib_test": "the distribution API",
    "keras.src.backend.torch.core_test": "torch core.py (patched)",
    "keras.src.backend.common.variables_test": "variables (torch Variable)",
    "keras.src.callbacks.callback_test": "callbacks (callback_list patched)",
    "keras.src.optimizers.optimizer_test": "optimizers (torch apply patched)",
    "keras.src.optimizers.adam_test": "Adam on torch",
    "keras.src.optimizers.sgd_test": "SGD on torch",
    "keras.src.optimizers.loss_scale_optimizer_test": "loss scaling",
    "keras.src.trainers.data_adapters.array_data_adapter_test": "arrays",
    "keras.src.trainers.data_adapters.generator_data_adapter_test": "gens",
    "keras.src.trainers.data_adapters.py_dataset_adapter_test": "PyDataset",
    "keras.src.trainers.data_adapters.torch_data_loader_adapter_test": "DL",
    "keras.src.trainers.data_adapters.tf_dataset_adapter_test": "tf.data",
    "keras.src.trainers.epoch_iterator_test": "epoch iteration",
    "keras.src.trainers.trainer_test": "fit/evaluate/predict (trainer patched)",
}

# Tests deselected, each with the reason. They fail on pristine upstream
# too in this environment.
DESELECTED = {
    "grain": "needs the `grain` package, which is not a test dependency "
    "(its data loaders do not concern the torch distribution work)",
}


def main(argv):
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--disable-warnings",
        "-k",
        " and ".join(f"not {name}" for name in DESELECTED),
        "--pyargs",
        *MODULES,
        *argv,
    ]
    for name, reason in DESELECTED.items():
        print(f"deselected '{name}': {reason}")
    env = dict(os.environ, KERAS_BACKEND="torch")
    env.setdefault("OMP_NUM_THREADS", "1")
    # From the repository root, so upstream's `from conftest import ...`
    # finds ours (conftest.py).
    return subprocess.call(command, cwd=REPO, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
