#!/usr/bin/env bash
# The GPU check: one script, about 8 minutes on one GPU, run whenever a GPU is lent.
#
#   tools/gpu_check.sh            (PYTHON=... to pick the interpreter; OUT=dir for the logs)
#
# 1. the tests marked `gpu` (DALI `mixed` decode, the head on CUDA under
#    torch.cuda.set_sync_debug_mode("error"), fp16 GEMMs against fp32, CPU<->GPU head state);
# 2. the head benchmark at 1M and 10M ids, r = 0.1, fp16, against insightface-style dense PFC;
# 3. the trainer: iresnet50, fp16, ZeRO-2, 1M ids (`python -m pfc_ds.train.bench --gpu`);
# 4. the data loader, DALI `mixed` row included (`python -m data_pipelines.bench`);
# 5. `pfc_ds.scale` at 1M and 10M ids (D=512, fp16, r = 0.1) on the one GPU, with the model;
# 6. `pfc_ds.profile` of iresnet50 / fp16 / ZeRO-2 (CUDA-event split and max-allocated memory);
# 7. the host bank at 50M ids (D=256, fp16, its gather prefetched during the backbone forward)
#    and, at 20M ids, host against device bank, img/s side by side.
# Steps 2-4 rewrite their sections of BENCHMARKS.md, naming the card and the date. A step that
# fails is reported and the others still run; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
failed=0

step() {
    local name=$1; shift
    echo "=== $name: $*" | tee -a "$OUT/summary.txt"
    local t0=$SECONDS
    if "$@" >"$OUT/$name.log" 2>&1; then
        echo "    ok ($((SECONDS - t0)) s)" | tee -a "$OUT/summary.txt"
    else
        echo "    FAILED ($((SECONDS - t0)) s); tail of $OUT/$name.log:" | tee -a "$OUT/summary.txt"
        tail -n 30 "$OUT/$name.log" | tee -a "$OUT/summary.txt"
        failed=$((failed + 1))
    fi
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
    >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
export PYTHONUNBUFFERED=1

step gpu_tests "$PY" -m pytest -q -m gpu tests
step head_bench "$PY" -m pfc_ds.bench.head --device cuda --classes 1000000 \
    --sweep 1000000,10000000 --skip-dense-fc --repeats 1 --steps 5 --write
step trainer_bench "$PY" -m pfc_ds.train.bench --gpu --steps 100
step data_bench "$PY" -m data_pipelines.bench --images 5000 --repeats 2
step scale_gpu "$PY" -m pfc_ds.scale --ids 1e6,1e7 --sample-rates 0.1 --world-size 1 \
    --embedding-size 512 --dtype fp16 --device cuda --steps 10 --output "$OUT/scale_gpu"
step profile_gpu "$PY" -m pfc_ds.profile --config configs/synthetic_3m_pfc01_r50.yaml \
    --deepspeed_config ds_configs/zero2_fp16.json --steps 20 --ranks 1 --output "$OUT/profile_gpu" \
    --set data.num_classes=1000000 --set train.batch_size=128
for spec in "host 50000000" "host 20000000" "device 20000000"; do
    set -- $spec
    step "bank_${1}_${2}" "$PY" -m pfc_ds.profile --config configs/synthetic_3m_pfc01_r50.yaml \
        --deepspeed_config ds_configs/zero2_fp16.json --steps 10 --ranks 1 \
        --output "$OUT/bank_${1}_${2}" --set data.num_classes="$2" --set model.embedding_size=256 \
        --set head.dtype=fp16 --set head.bank="$1" --set train.batch_size=128
done
cp BENCHMARKS.md "$OUT/" 2>/dev/null
echo "failed steps: $failed" | tee -a "$OUT/summary.txt"
exit "$failed"
