"""Private PyTorch APIs are used in one module, and untested torch warns.

Every use of a torch internal lives in
`keras/src/backend/torch/torch_internals.py`; this test scans our other
modules and the lines our patches add for the usual forms of one.
"""

import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INTERNALS = REPO / "keras/src/backend/torch/torch_internals.py"

# `torch._C`, a DTensor's `._local_tensor`, private torch modules
# (`torch.distributed.tensor._utils`), the autograd engine, c10d's private
# helpers and DTensor's dispatcher. Not `torch._foreach_*`: the multi-tensor
# ops `torch.optim` is built on, which upstream Keras's torch optimizers
# (and so our patches to them) call throughout.
PRIVATE_USE = re.compile(
    r"torch\._C\b|\._local_tensor\b|torch(\.\w+)*\._(?!foreach_)[a-z]\w*|"
    r"_execution_engine|distributed_c10d\._|_op_dispatcher|"
    r"from torch[\w.]* import _\w+"
)


def _code_lines(text):
    """Lines that are not comments or docstring prose (best effort)."""
    in_docstring = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_docstring or stripped.startswith("#"):
            in_docstring ^= quotes % 2 == 1
            continue
        if quotes:
            in_docstring = quotes % 2 == 1
            continue
        yield number, line


def _our_code():
    for path in sorted((REPO / "keras").rglob("*.py")):
        if path != INTERNALS:
            yield path, path.read_text()
    for patch in sorted((REPO / "patches").glob("*.patch")):
        added = [
            line[1:]
            for line in patch.read_text().splitlines()
            if line.startswith("+") and not line.startswith("+++")
        ]
        yield patch, "\n".join(added)


def test_private_torch_apis_are_used_only_in_torch_internals():
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path, text in _our_code()
        for number, line in _code_lines(text)
        if PRIVATE_USE.search(line)
    ]
    assert not found, (
        "Private torch APIs used outside torch_internals.py; move them "
        "there behind a named function:\n" + "\n".join(found)
    )


def test_the_scan_finds_private_uses():
    for line in (
        "local = x._local_tensor",
        "task = torch._C._current_graph_task_id()",
        "from torch.distributed.tensor._utils import f",
        "from torch.distributed.tensor import _sharding_prop",
        "store = dist.distributed_c10d._get_default_store()",
    ):
        assert PRIVATE_USE.search(line), line
    for line in (
        "from torch.distributed.tensor import DTensor",
        "dist.all_reduce(x)",
        "local = x.to_local()",
        "torch._foreach_addcmul_(v_list, grads, grads, value=0.001)",
    ):
        assert not PRIVATE_USE.search(line), line


@pytest.fixture
def internals():
    pytest.importorskip("torch.distributed.tensor")
    from keras.src.backend.torch import torch_internals

    torch_internals._warned[0] = False
    yield torch_internals
    torch_internals._warned[0] = False


@pytest.mark.parametrize(
    "version, release",
    [
        ("2.13.0", "2.13.0"),
        ("2.13.0+cpu", "2.13.0"),
        ("2.14.0a0+git1", "2.14.0"),
    ],
)
def test_torch_release(internals, version, release):
    assert internals.torch_release(version) == release


def test_untested_torch_warns_once_on_rank_0(internals, monkeypatch):
    monkeypatch.setattr(internals.torch, "__version__", "2.99.0+cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        internals.warn_if_untested_torch(1)
        internals.warn_if_untested_torch(0)
        internals.warn_if_untested_torch(0)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "torch 2.99.0+cpu is installed" in messages[0]
    assert "pip install torch==2.13.0" in messages[0]


def test_tested_torch_does_not_warn(internals, monkeypatch):
    monkeypatch.setattr(internals.torch, "__version__", "2.13.0+cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        internals.warn_if_untested_torch(0)
    assert not caught
