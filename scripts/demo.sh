#!/usr/bin/env bash
# The main job: the distributed demo on 2 CPU processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
export KERAS_BACKEND=torch OMP_NUM_THREADS=1
exec timeout 600 .venv/bin/torchrun --nproc-per-node 2 \
    --rdzv-backend c10d --rdzv-endpoint localhost:0 \
    examples/distributed_demo.py
