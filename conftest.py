"""Repository-wide pytest configuration.

Upstream Keras's test modules (run against the fork by
`tests/upstream/run_upstream_tests.py`) import `skip_if_backend` from the
`conftest` module of the repository they run in and use a few markers;
this module provides our own versions of them.
"""

import os

# The suite exercises the torch backend; workers set it too.
os.environ.setdefault("KERAS_BACKEND", "torch")

import pytest  # noqa: E402

MARKERS = {
    "requires_trainable_backend": "needs a backend that can train",
    "multi_device": "needs several devices in one process",
    "extra_large": "a large test",
}


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


def pytest_collection_modifyitems(config, items):
    from keras.src import backend

    if backend.backend() != "numpy":
        return
    skip = pytest.mark.skip(reason="The numpy backend cannot train.")
    for item in items:
        if "requires_trainable_backend" in item.keywords:
            item.add_marker(skip)


def skip_if_backend(given_backend, reason):
    """Mark a test to be skipped on `given_backend`."""
    from keras.src import backend

    return pytest.mark.skipif(backend.backend() == given_backend, reason=reason)
