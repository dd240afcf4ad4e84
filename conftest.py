"""Repository-wide pytest configuration."""

import os

# The suite exercises the torch backend; workers set it too.
os.environ.setdefault("KERAS_BACKEND", "torch")
