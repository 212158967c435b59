#!/usr/bin/env bash
# One device call: `affmae bench` of affmae_base beside vitmae_base (captured and eager steps, no profile) at the
# issue's sizes, then `kernels/real_em.py` on sbem-mito with what time is left; at most eight files to $OUT.
# Run from the repository root with .whl and data_em_r3 carried (data_em_r3: sbem-mito and podocyte-tem of
# `kernels/prep_data_em.py ../shared/data data_em_r --limit 40`):
#   BENCH_S=300 TOTAL_S=585 bash kernels/session_bench_em.sh
set -uo pipefail
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log=$OUT/session_gpu.log
step() { local t=$1; shift; echo "== $(date -u +%T) $* (limit ${t}s)" | tee -a "$log"
  timeout "$t" "$@" > /tmp/step.log 2>&1; local rc=$?; grep -v USDT /tmp/step.log | tail -60 >> "$log"; return $rc; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$log"
step "${BENCH_S:-300}" python -m affmae.bench --archs affmae_base,vitmae_base --sizes 512,1024,2048,256,256,256,256 \
  --bs 32,8,2,8,16,32,128 --steps 10 --warmup 3 --no_profile --json "$OUT/bench_results.json"
left=$(( ${TOTAL_S:-585} - $(date +%s) + t0 ))
step "$left" python kernels/real_em.py --data data_em_r3 --out "$OUT" --budget "$(( left - 20 ))" --sets sbem-mito
echo "== $(date -u +%T) done" >> "$log"
