#!/usr/bin/env bash
# Create .venv (or reuse it) with torch and the fork installed from this
# checkout, as a user would get it with `pip install .`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r requirements.txt "$@"
# Always rebuild: the fork is assembled from upstream keras at build time.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --force-reinstall --no-deps .
.venv/bin/python -m pip install --quiet --disable-pip-version-check .
