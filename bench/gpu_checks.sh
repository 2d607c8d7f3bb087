#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, as one script (a lent GPU machine is held
# for minutes, so everything runs in one go). Uses the machine's own python3 with torch,
# numpy, scipy, scikit-learn, safetensors, rich and pytest already there; nothing is installed.
#
#   OUT=/some/folder bash bench/gpu_checks.sh
#
# Writes into $OUT: pytest_cuda.log (the CUDA half of the device-parametrised tests),
# train_step_{base,medium}.{txt,json} (bench/train_step.py, batch 64 + 64) and
# inference_medium.{txt,json}. Each stage runs even when an earlier one fails.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the logs}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
status=0
run() {  # run NAME CMD...: tee the output into $OUT/NAME, remember a failure
    local name=$1
    shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name" || status=1
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/machine.txt"

run pytest_cuda.log timeout 240 $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts= \
    tests/test_backbone.py tests/test_lora.py tests/test_rank_allocation.py tests/test_trainer.py \
    tests/test_e2e_finetune.py
for config in base medium; do
    run "train_step_$config.txt" timeout 150 $PY bench/train_step.py --config "$config" --batch 64 \
        --steps 5 --rounds 6 --pairs 40 --device cuda --json "$OUT/train_step_$config.json"
done
run inference_medium.txt timeout 60 $PY bench/inference.py --config medium --batch 64 --rounds 40 \
    --device cuda --json "$OUT/inference_medium.json"
exit $status
