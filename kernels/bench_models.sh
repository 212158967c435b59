#!/usr/bin/env bash
# GPU runs of `affmae bench` (issue 8), one call each, results and logs to $OUT.
#   bash kernels/bench_models.sh smoke  # ViT-MAE-Base vs the H100 baseline (512² b32), harness check, OOM search
#   bash kernels/bench_models.sh        # the full comparison: AFFMAE-Base vs ViT-MAE-Base at 512², 1024², 2048²
#                                       # (batches 32/8/2 and the largest batch that fits) in one process; then, if
#                                       # time is left, AFFMAE-Base at 2048² batch 4 under a 24 GiB budget
# Needs fastcore on the GPU machine: run `bash /work/shared/gpu-wheels.sh` here once and carry .whl.
set -uo pipefail
t0=$(date +%s); mode=${1:-full}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/env.txt"
bench() { name=$1; shift; python3 -m affmae.bench "$@" --json "$OUT/$name.json" 2>&1 | grep -v 'USDT\|SyncActivityProfilerHandler' | tee "$OUT/$name.log"; }
if [ "$mode" = smoke ]; then
  bench smoke --archs vitmae_base,affmae_base --sizes 512 --bs 32 --steps 6 --warmup 2
  bench smoke_auto --archs vitmae_base --sizes 512 --bs 32,auto --steps 4 --warmup 1 --no_profile
else
  bench bench_results --archs affmae_base,vitmae_base --sizes 512,1024,2048 --bs 32,8,2,auto
  left=$(( 450 - ($(date +%s) - t0) )); echo "== $left s left"
  if [ "$left" -gt 60 ]; then
    timeout $(( left - 10 )) bash -c "$(declare -f bench); OUT=$OUT bench bench_24gib --archs affmae_base --sizes 2048 --bs 4 --mem_gib 24 --steps 3 --warmup 1 --no_profile"
  fi
fi
echo "== total $(( $(date +%s) - t0 )) s"
