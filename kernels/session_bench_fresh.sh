#!/usr/bin/env bash
# One device call: the fused LayerNorm's GPU check, then `affmae bench` of affmae_base beside vitmae_base (captured
# and eager, no profile) with every size in a fresh process, so that no row inherits memory from the one before,
# merged into $OUT/bench_results.json; then AFFMAE-Base at 2048² batch 4 under 24 GiB, and the captured-vs-eager check.
# Run from the repository root with .whl carried (bash ../shared/gpu-wheels.sh):
#   bash kernels/session_bench_fresh.sh
#   ARCHS=affmae_tiny,vitmae_tiny ROWS="64:2 32:4" TINY=1 OUT=/tmp/o bash kernels/session_bench_fresh.sh   # CPU check
set -uo pipefail
t0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "${TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=.:/tmp/site
else export PYTHONPATH=.; fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log=$OUT/session_gpu.log
step() { local t=$1; shift; echo "== $(date -u +%T) $* (limit ${t}s)" | tee -a "$log"; timeout "$t" "$@" > /tmp/step.log 2>&1; local rc=$?; grep -v 'USDT\|SyncActivityProfilerHandler' /tmp/step.log | tail -40 >> "$log"; return $rc; }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$log"
step 120 python3 kernels/check_layer_norm.py --out "$OUT" ${TINY:+--tiny}
parts=()
for row in ${ROWS:-512:32 1024:8 2048:2 256:8 256:16 256:32 256:128}; do
  s=${row%:*}; b=${row#*:}
  step 90 python3 -m affmae.bench --archs "${ARCHS:-affmae_base,vitmae_base}" --sizes "$s" --bs "$b" --steps 10 \
    --warmup 3 --no_profile --json "/tmp/bench_${s}_${b}.json" && parts+=("/tmp/bench_${s}_${b}.json")
done
python3 - "$OUT/bench_results.json" "${parts[@]}" <<'PY'
import json, sys
out, parts = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
res = dict(parts[0], records=[r for p in parts for r in p['records']],
           command='; '.join(p['command'] for p in parts) + '  (one process per size)')
open(out, 'w').write(json.dumps(res, indent=1))
print(f'{len(res["records"])} records from {len(parts)} processes -> {out}')
PY
[ -z "${TINY:-}" ] && step 90 python3 -c "
from affmae.bench import run_bench
run_bench(['affmae_base'], sizes=(2048,), bs=(4,), steps=3, warmup=3, profile=False, mem_gib=24,
          modes=('captured',), json_path='$OUT/bench_24gib.json')"
left=$(( 585 - $(date +%s) + t0 ))
[ -z "${TINY:-}" ] && [ "$left" -gt 30 ] && step "$left" python3 kernels/check_capture.py --out "$OUT/check_capture.json"
echo "== $(date -u +%T) done in $(( $(date +%s) - t0 )) s" | tee -a "$log"
