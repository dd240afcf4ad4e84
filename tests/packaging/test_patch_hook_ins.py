"""Patches to files every backend shares are backend-neutral hook-ins.

Upstream maintainers review the series as a pull request: a shared file
(outside `keras/src/backend/torch/`) may call a hook that any backend can
provide, such as a function or flag of `backend.distribution_lib` or a
`_backend_*` method, but must not test for the torch backend or import
torch code. The torch logic stays in our modules.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Files where torch-specific lines belong: the torch backend, and the
# backend switch that gives torch its `distribution_lib`.
TORCH_FILES = re.compile(r"keras/src/backend/(torch/.*|__init__\.py)$")
TORCH_SPECIFIC = re.compile(r"\btorch\b|backend\(\)\s*[!=]=|\"torch\"|'torch'")


def torch_lines_in_shared_files(patch_text):
    """`(file, line)` for each added line of a shared file that is torch
    specific."""
    found = []
    path = None
    for line in patch_text.splitlines():
        if line.startswith("+++ "):
            path = line[4:].strip().removeprefix("b/")
        elif line.startswith("+") and path and not TORCH_FILES.match(path):
            if TORCH_SPECIFIC.search(line):
                found.append((path, line[1:].strip()))
    return found


def test_shared_files_get_backend_neutral_hook_ins():
    found = [
        f"{patch.name}: {path}: {line}"
        for patch in sorted((REPO / "patches").glob("*.patch"))
        for path, line in torch_lines_in_shared_files(patch.read_text())
    ]
    assert not found, (
        "Torch-specific lines in files every backend shares; add a hook "
        "there (a `backend.distribution_lib` function, a `_backend_*` "
        "method) and put the torch code in our modules:\n" + "\n".join(found)
    )


def test_the_check_finds_torch_specific_lines():
    patch = "\n".join(
        [
            "--- a/keras/src/optimizers/loss_scale_optimizer.py",
            "+++ b/keras/src/optimizers/loss_scale_optimizer.py",
            "@@ -1,1 +1,3 @@",
            '+        if backend.backend() == "torch":',
            "+            from keras.src.backend.torch import x",
            "+        grads = self._backend_reduce_gradients(grads)",
            "--- a/keras/src/backend/torch/trainer.py",
            "+++ b/keras/src/backend/torch/trainer.py",
            "@@ -1,1 +1,2 @@",
            "+from keras.src.backend.torch import distributed_data",
        ]
    )
    found = torch_lines_in_shared_files(patch)
    assert [line for _, line in found] == [
        'if backend.backend() == "torch":',
        "from keras.src.backend.torch import x",
    ]
