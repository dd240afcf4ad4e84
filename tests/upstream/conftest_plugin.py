"""Pytest plugin standing in for upstream Keras's repository `conftest.py`.

Upstream's test modules ship in the keras wheel, but the repository-level
`conftest.py` they rely on does not. This plugin, loaded with
`-p conftest_plugin` by `run_upstream_tests.py`, provides what they use:

- the markers `requires_trainable_backend`, `multi_device` and
  `extra_large` (registered; `requires_trainable_backend` skips on the
  backends that cannot train, as upstream does);
- `skip_if_backend`, which some modules import with
  `from conftest import skip_if_backend`: this module is registered under
  the name `conftest` too;
- torch imported before tensorflow (upstream notes the reverse order can
  segfault), and jax kept at 32-bit default dtypes as upstream does.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("JAX_DEFAULT_DTYPE_BITS", "32")

try:
    import torch  # noqa: F401  (must come before tensorflow)
except ImportError:
    torch = None

import pytest  # noqa: E402

# `from conftest import skip_if_backend` in upstream test modules.
sys.modules.setdefault("conftest", sys.modules[__name__])

MARKERS = {
    "requires_trainable_backend": "needs a backend that can train",
    "multi_device": "needs several devices in one process",
    "extra_large": "a large test",
}
UNTRAINABLE_BACKENDS = ("numpy", "openvino")


def pytest_configure(config):
    """Registers the markers upstream's test modules use."""
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    """Skips `requires_trainable_backend` tests where training is absent.

    Args:
        config: The pytest config.
        items: The collected test items, modified in place.
    """
    from keras.src.backend import backend

    if backend() in UNTRAINABLE_BACKENDS:
        skip = pytest.mark.skip(reason=f"The {backend()} backend cannot train.")
        for item in items:
            if "requires_trainable_backend" in item.keywords:
                item.add_marker(skip)


def skip_if_backend(given_backend, reason):
    """Marks a test to be skipped on `given_backend`, as upstream's does.

    Args:
        given_backend: The backend name, e.g. `"jax"`.
        reason: Why the test does not apply there.

    Returns:
        A `pytest.mark.skipif` marker.
    """
    from keras.src.backend import backend

    return pytest.mark.skipif(backend() == given_backend, reason=reason)
