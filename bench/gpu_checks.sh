#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, as one script (a lent GPU machine is held
# for minutes, so everything runs in one go). Uses the machine's own python3 with torch,
# numpy, scipy, scikit-learn, safetensors, rich and pytest already there; nothing is installed.
#
#   OUT=/some/folder bash bench/gpu_checks.sh
#
# Writes into $OUT: gpu_checks.log (everything printed: the machine, the CUDA half of the
# device-parametrised tests, the benchmark tables), train_step_{base,medium,large}.json
# (bench/train_step.py, batch 64 + 64), encoder_layout.json and inference_medium.json.
# Each stage runs even when an earlier one fails; the exit status says whether any failed.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
status=0
stage() {  # stage CMD...: run it, remember a failure
    echo "=== $*"
    "$@" || status=1
}

{
    stage nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    stage $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    stage timeout 240 $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts= \
        tests/test_backbone.py tests/test_lora.py tests/test_rank_allocation.py tests/test_trainer.py \
        tests/test_e2e_finetune.py
    for config in base medium large; do
        stage timeout 180 $PY bench/train_step.py --config "$config" --batch 64 --steps 5 --rounds 6 \
            --pairs 40 --device cuda --json "$OUT/train_step_$config.json"
    done
    stage timeout 120 $PY bench/encoder_layout.py --config base medium --batch 64 --device cuda \
        --json "$OUT/encoder_layout.json"
    stage timeout 60 $PY bench/inference.py --config medium --batch 64 --rounds 40 --device cuda \
        --json "$OUT/inference_medium.json"
    echo "=== gpu_checks: $([ $status = 0 ] && echo all stages passed || echo A STAGE FAILED)"
    exit $status
} 2>&1 | tee "$OUT/gpu_checks.log"
exit "${PIPESTATUS[0]}"
