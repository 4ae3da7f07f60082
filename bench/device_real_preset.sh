#!/usr/bin/env bash
# The device check of issue 21 in one command (the device tool's command: `bash bench/device_real_preset.sh`): the
# real preset (EVA ViT-g + Llama-2-7B shapes, random weights, bf16) on the GPU, batch 1 against the roofline, batch 8
# and 32 static vs continuous (bench/device_real_preset.py); the JSON and the log go to $OUT. Wheels in .whl/ (this
# project's transformers and peft, bench/README.md) are installed first when they are there. Extra arguments go to
# the python entry (e.g. --new-tokens 128 --runs 2).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder the results are written to}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
timeout 480 "${PYTHON:-python3}" -m bench.device_real_preset --out "$OUT/real_preset.json" "$@" 2>&1 \
    | tee "$OUT/real_preset.log"
