#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, as one script (a lent GPU machine is held
# for minutes, so everything runs in one go). Uses the machine's own python3 with torch,
# numpy, scipy, scikit-learn, safetensors, rich and pytest already there; nothing is installed.
#
#   OUT=/some/folder bash bench/gpu_checks.sh
#
# Writes into $OUT: gpu_checks.log (everything printed: the machine, the CUDA half of the
# device-parametrised tests and the tests marked cuda - among them the bf16-vs-fp32 accuracy
# parity of tests/unit/test_precision.py -, the benchmark tables), train_step_{base,medium,large}.json
# (bench/train_step.py, batch 64 + 64, fp32 and bf16 side by side, with the loader's share),
# encoder_layout.json, inference_medium.json and predict_precision.json (records/s of the
# Predictor that `cessl predict` uses, medium, fp32 vs bf16).
# Each stage runs even when an earlier one fails; the exit status says whether any failed.
# Budget: about 4-6 minutes on an H200 (the stage timeouts add up to 12); rerun single stages
# by hand if one times out.
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
    stage timeout 240 $PY -m pytest -q -s -m cuda -p no:cacheprovider -o addopts= \
        tests/unit/test_backbone.py tests/unit/test_lora.py tests/unit/test_rank_allocation.py tests/unit/test_trainer.py \
        tests/integration/test_e2e_finetune.py tests/unit/test_precision.py
    for config in base medium large; do
        stage timeout 180 $PY bench/train_step.py --config "$config" --batch 64 --steps 5 --rounds 6 \
            --pairs 40 --warmup 5 --device cuda --precisions fp32 bf16 --json "$OUT/train_step_$config.json"
    done
    stage timeout 120 $PY bench/encoder_layout.py --config base medium --batch 64 --device cuda \
        --json "$OUT/encoder_layout.json"
    stage timeout 60 $PY bench/inference.py --config medium --batch 64 --rounds 40 --device cuda \
        --json "$OUT/inference_medium.json"
    stage timeout 90 $PY - "$OUT/predict_precision.json" <<'EOF'
# Records/s of ml.eval.predictor.Predictor (what `cessl predict` runs) on a merged medium model, fp32 vs bf16.
import json, sys, time
import numpy as np, torch
from ml.eval.predictor import Predictor
from ml.model.backbone import backbone_config
from ml.model.lora import LoRAConfig, merge_lora
from ml.train.build import build_model
model = build_model(None, backbone_config("medium", 19), "cessl", LoRAConfig(), seed=0)
merge_lora(model)
signals = np.random.default_rng(0).standard_normal((512, 12, 6144)).astype(np.float32)
out, probs = {}, {}
for precision in ("fp32", "bf16", "fp32", "bf16"):  # the second round is the one timed
    predictor = Predictor(model, [str(k) for k in range(19)], np.full(19, 0.5), "bench", 64, "cuda", precision)
    torch.cuda.synchronize(); start = time.perf_counter()
    probs[precision] = predictor.predict_proba(signals)
    out[precision] = {"records_per_s": len(signals) / (time.perf_counter() - start)}
out["max_abs_prob_diff"] = float(np.abs(probs["fp32"] - probs["bf16"]).max())
out["same_decisions"] = float(((probs["fp32"] > 0.5) == (probs["bf16"] > 0.5)).mean())
out["device"] = torch.cuda.get_device_name()
print(json.dumps(out, indent=2)); open(sys.argv[1], "w").write(json.dumps(out, indent=2))
EOF
    echo "=== gpu_checks: $([ $status = 0 ] && echo all stages passed || echo A STAGE FAILED)"
    exit $status
} 2>&1 | tee "$OUT/gpu_checks.log"
exit "${PIPESTATUS[0]}"
