#!/usr/bin/env bash
# The GPU checks, as one short script for a lent GPU machine (docs/speed.md, "On a GPU"):
#   bash bench/gpu_check.sh          # about 8 minutes on an H200, venv included if missing
# 1. b/a for efficientnet_b0 at 224x224 and BaseModel at 128x96 with --amp --channels_last (goal >= 0.95)
# 2. torch.compile (default, reduce-overhead = CUDA graphs): first step and break-even
# 3. one short trial per feed: both train, the first epoch's figures agree, the feed line says why
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt; }
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
$PY bench/benchmark.py --models efficientnet_b0 --resize 224 224 --device cuda --amp --channels_last --skip_memory \
    --compile default reduce-overhead
$PY bench/benchmark.py --models BaseModel --resize 128 96 --device cuda --amp --channels_last --skip_memory
for feed in device loader; do
    $PY train.py --model efficientnet_b0 --resize 224 224 --epochs 2 --device cuda --amp --channels_last \
        --feed "$feed" --name "gpu_$feed" --model_dir /tmp/gpu_check 2>&1 | grep -E "^data feed|^first step|^epoch"
done
