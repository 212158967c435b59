#!/usr/bin/env bash
# GPU runs for the captured step (one call each; results and logs to $OUT). Carry .whl (bash ../shared/gpu-wheels.sh).
#   bash kernels/bench_speed.sh check   # captured vs eager step (kernels/check_capture.py) and a 256² smoke bench
#   bash kernels/bench_speed.sh full    # affmae_base vs vitmae_base, captured and eager, 256²-2048², the fastai
#                                       # loop beside it, and AFFMAE-Base at 2048² batch 4 under 24 GiB
#   bash kernels/bench_speed.sh bench   # the same without the fastai loop, after kernels/check_capture.py
set -uo pipefail
t0=$(date +%s); mode=${1:-full}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', \
  torch.version.cuda)" | tee -a "$OUT/env.txt"
bench() { name=$1; shift; python3 -m affmae.bench "$@" --json "$OUT/$name.json" 2>&1 |
  grep -v 'USDT\|SyncActivityProfilerHandler' | tee "$OUT/$name.log"; }
if [ "$mode" = check ]; then
  python3 kernels/check_capture.py --out "$OUT/check_capture.json" 2>&1 | tee "$OUT/check_capture.log"
  bench smoke --archs affmae_base,vitmae_base --sizes 256 --bs 8 --steps 6 --warmup 3
else
  [ "$mode" = bench ] && python3 kernels/check_capture.py --out "$OUT/check_capture.json" 2>&1 |
    tee "$OUT/check_capture.log"
  bench bench_results --archs affmae_base,vitmae_base --sizes 256,256,256,256,512,1024,2048 --bs 8,16,32,128,32,8,2 \
    --steps 10 --warmup 3
  [ "$mode" = full ] && python3 kernels/fastai_loop.py --out "$OUT/fastai_loop.json" 2>&1 | grep -v 'Epoch\|epoch' |
    tee "$OUT/fastai_loop.log"
  python3 -c "
import json
from affmae.bench import run_bench
for ck in (False, True):
    r = run_bench(['affmae_base'], sizes=(2048,), bs=(4,), steps=3, warmup=3, profile=False, mem_gib=24,
                  modes=('captured',), model_kw=dict(checkpoint=ck), json_path='$OUT/bench_24gib_ck%d.json' % ck)
" 2>&1 | tee "$OUT/bench_24gib.log"
fi
echo "== total $(( $(date +%s) - t0 )) s"
