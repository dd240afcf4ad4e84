#!/usr/bin/env bash
# Every test: lint, packaging, the multi-process suite, upstream's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh -r requirements-test.txt
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    --no-deps -r requirements-hub.txt
export KERAS_BACKEND=torch OMP_NUM_THREADS=1
.venv/bin/ruff check .
.venv/bin/python -m pytest tests/packaging integration_tests
# Upstream's modules are single-process: one pytest worker per core.
.venv/bin/python tests/upstream/run_upstream_tests.py -n 2
