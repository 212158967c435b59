#!/usr/bin/env bash
# One device call: kernel checks (CHECKS: layer_norm, norm_linear, bias_grad, weight_casts, cluster_attention), then
# `affmae bench` of affmae_base beside vitmae_base (captured and eager, no profile) with every size in a fresh
# process, so that no row inherits memory from the one before, merged into $OUT/bench_results.json after each row (a
# call cut short keeps the rows done); then, if time is left (TOTAL_S), the CK_ROWS="S:B ..." rows of AFFMAE-Base
# with its first stage checkpointed, AFFMAE-Base at 2048² batch 4 under 24 GiB (without checkpointing, then with it
# on the first stage only), operator profiles of the PROFILE="S:B ..." rows, the MEMPEAK="S:B ..." rows' memory at
# the peak by allocation site, and the captured-vs-eager check (CAPTURE=0: not).
# Run from the repository root with .whl carried (bash ../shared/gpu-wheels.sh; WHL=.whl_gpu: another wheel folder;
# ROWS=" ", a space: no bench row):
#   bash kernels/session_bench_fresh.sh
#   CHECKS="cluster_attention" CA_CASES=60 TOTAL_S=480 ROW_S=110 bash kernels/session_bench_fresh.sh   # ROW_S: per row
#   ARCHS=affmae_tiny,vitmae_tiny ROWS="64:2 32:4" TINY=1 OUT=/tmp/o bash kernels/session_bench_fresh.sh   # CPU check
set -uo pipefail
t0=$(date +%s)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -z "${TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${WHL:-.whl}"/*.whl || exit 1
  export PYTHONPATH=.:/tmp/site
else export PYTHONPATH=.; fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
log=$OUT/session_gpu.log
step() {   # step LIMIT_S COMMAND...: run with a time limit, log the command and the tail of its output
  local t=$1; shift; echo "== $(date -u +%T) $* (limit ${t}s)" | tee -a "$log"
  timeout "$t" "$@" > /tmp/step.log 2>&1; local rc=$?
  grep -v 'USDT\|SyncActivityProfilerHandler' /tmp/step.log | tail -40 >> "$log"; return $rc
}
left() { echo $(( ${TOTAL_S:-585} - $(date +%s) + t0 )); }
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> "$log"
for c in ${CHECKS-layer_norm}; do
  case $c in
    layer_norm) step 120 python3 kernels/check_layer_norm.py --out "$OUT" ${TINY:+--tiny} ;;
    norm_linear) step 120 python3 kernels/check_norm_linear.py --out "$OUT" ${TINY:+--tiny} ;;
    bias_grad) step 90 python3 kernels/bench_bias_grad.py --out "$OUT" ${TINY:+--tiny} ;;
    weight_casts) step 90 python3 kernels/bench_weight_casts.py --out "$OUT" ;;
    cluster_attention)
      step 120 env AFFMAE_AUTOTUNE=0 python3 kernels/check_cluster_attention.py --n "${CA_CASES:-120}" ;;
  esac
done
parts=()
for row in ${ROWS:-512:32 1024:8 2048:2 256:8 256:16 256:32 256:128}; do
  [ "$(left)" -lt 60 ] && { echo "== no time left for $row" | tee -a "$log"; break; }
  s=${row%:*}; b=${row#*:}; part=/tmp/bench_${s}_${b}.json
  step "${ROW_S:-110}" python3 -m affmae.bench --archs "${ARCHS:-affmae_base,vitmae_base}" --sizes "$s" --bs "$b" \
    --steps 10 --warmup 3 --no_profile --json "$part" || continue
  parts+=("$part")
  python3 - "$OUT/bench_results.json" "${parts[@]}" <<'PY'
import json, sys
out, parts = sys.argv[1], [json.load(open(p)) for p in sys.argv[2:]]
res = dict(parts[0], records=[r for p in parts for r in p['records']],
           command='; '.join(p['command'] for p in parts) + '  (one process per size)')
open(out, 'w').write(json.dumps(res, indent=1))
PY
done
for row in ${CK_ROWS-}; do   # CK_ROWS="512:32": AFFMAE-Base alone with its first stage checkpointed (memory for time)
  [ "$(left)" -lt 60 ] && break
  step 90 python3 -m affmae.bench --archs affmae_base --sizes "${row%:*}" --bs "${row#*:}" --steps 10 --warmup 3 \
    --modes captured --no_profile --checkpoint 0 --json "$OUT/bench_ck0_${row%:*}_${row#*:}.json"
done
for ck in ${CK24-none 0}; do   # AFFMAE-Base at 2048² batch 4 under 24 GiB: no checkpointing (none), stage 0's (0);
  # CK24_S: its limit (on a cold machine, first in the call, compiling and autotuning alone took more than 90 s)
  [ -z "${TINY:-}" ] && [ "$(left)" -gt 60 ] && step "${CK24_S:-150}" python3 -m affmae.bench --archs affmae_base \
    --sizes 2048 --bs 4 --steps 3 --warmup 3 --mem_gib 24 --modes captured --no_profile \
    $([ "$ck" = none ] || echo --checkpoint "$ck") --json "$OUT/bench_24gib_ck$ck.json"
done
for row in ${PROFILE-}; do   # PROFILE="256:8 512:32": one eager step of each arch profiled (kernels/profile_ops.py)
  [ "$(left)" -lt 60 ] && break
  step 90 python3 kernels/profile_ops.py --archs "${ARCHS:-affmae_base,vitmae_base}" --size "${row%:*}" \
    --bs "${row#*:}" --out "$OUT"
done
for row in ${MEMPEAK-}; do   # MEMPEAK="512:32": what is alive at each arch's peak, by allocation site
  [ "$(left)" -lt 60 ] && break
  step 90 python3 kernels/memory_peak.py --archs "${ARCHS:-affmae_base,vitmae_base}" --size "${row%:*}" \
    --bs "${row#*:}" --out "$OUT"
done
[ -z "${TINY:-}" ] && [ "${CAPTURE:-1}" = 1 ] && [ "$(left)" -gt 30 ] && \
  step "$(left)" python3 kernels/check_capture.py --out "$OUT/check_capture.json"
echo "== $(date -u +%T) done in $(( $(date +%s) - t0 )) s" | tee -a "$log"
