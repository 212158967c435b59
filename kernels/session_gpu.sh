#!/usr/bin/env bash
# One device call that runs this round's GPU checks and benchmarks, each under its own time limit, writing at most
# eight files to $OUT (the device returns eight at most). Run from the repository root with .whl, data_em_abl and
# data_em_abl_clahe carried (see kernels/ablation_recipe.py for how the data folders are made):
#   ABLATION_S=400 PRE_STEPS=120 FT_STEPS=150 bash kernels/session_gpu.sh
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log=$OUT/session_gpu.log
step() { local t=$1; shift; echo "== $(date -u +%T) $* (limit ${t}s)" | tee -a "$log"
  timeout "$t" "$@" > /tmp/step.log 2>&1; local rc=$?; tail -40 /tmp/step.log >> "$log"; return $rc; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$log"
step 90 python kernels/check_capture_seg.py --out "$OUT/check_capture_seg.json"
step 75 python kernels/bench_shards.py --images data_em_abl --steps 20 --out "$OUT/bench_shards.json" ||
  step 60 python kernels/bench_shards.py --images data_em_abl --steps 20 --no-capture \
    --out "$OUT/bench_shards_eager.json"
step "${ABLATION_S:-400}" python kernels/ablation_recipe.py --data data_em_abl --paper-data data_em_abl_clahe \
  --out "$OUT" --budget "$(( ${ABLATION_S:-400} - 25 ))" --pre-steps "${PRE_STEPS:-120}" --ft-steps "${FT_STEPS:-150}"
echo "== $(date -u +%T) done" >> "$log"
