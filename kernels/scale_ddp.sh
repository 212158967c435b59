#!/usr/bin/env bash
# Two-GPU scaling of data-parallel pretraining: needs a machine with two GPUs (nvidia-h200-x2); not run yet.
#   bash kernels/scale_ddp.sh IMAGES          # IMAGES: a folder of EM images (512² crops or larger)
# Carry .whl (bash ../shared/gpu-wheels.sh: fastai & co, webdataset, braceexpand; PyYAML if the machine lacks it) and
# IMAGES. It packs IMAGES into shards once, then runs kernels/bench_shards.py (AFFMAE-Base, 512², batch 32 per GPU,
# streamed from the shards, 8 loader workers per GPU) three times: one GPU captured (the default step), one GPU
# eager, and two GPUs under torchrun (eager: DDP switches capture off). It writes $OUT/scale_ddp.json with all three
# and the ratios of two-GPU to one-GPU images per second (target: >= 1.8 against the eager one-GPU run); copy it to
# kernels/results/scale_ddp.json, which nbs/14_distributed.ipynb reads.
set -euo pipefail
IMAGES=${1:?usage: bash kernels/scale_ddp.sh IMAGES}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
run=(kernels/bench_shards.py --images "$IMAGES" --shards /tmp/shards --arch affmae_base --size 512 --bs 32 --steps 30)
python3 "${run[@]}" --out "$OUT/one_gpu_captured.json" 2>&1 | tee "$OUT/one_gpu_captured.log"
python3 "${run[@]}" --no-capture --out "$OUT/one_gpu.json" 2>&1 | tee "$OUT/one_gpu.log"
python3 -m torch.distributed.run --standalone --nproc_per_node 2 "${run[@]}" --out "$OUT/two_gpu.json" 2>&1 \
  | tee "$OUT/two_gpu.log"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
r = {k: json.loads((out / f'{k}.json').read_text()) for k in ('one_gpu', 'one_gpu_captured', 'two_gpu')}
res = dict(device=r['two_gpu']['device'], date=r['two_gpu']['date'], command='bash kernels/scale_ddp.sh IMAGES', **r,
           speedup=round(r['two_gpu']['img_s'] / r['one_gpu']['img_s'], 3),
           speedup_vs_captured=round(r['two_gpu']['img_s'] / r['one_gpu_captured']['img_s'], 3))
res['target_met'] = res['speedup'] >= 1.8
(out / 'scale_ddp.json').write_text(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}, indent=1))
PY
